"""Hugging Face Mixtral weights <-> our parameter tree: one explicit name and layout table.

Each `TensorMap` row names one of our leaves, the HF key template of one slice of it (per layer
`{layer}`, per expert `{expert}`), and the two layout transforms of that slice. Our leaves stack
layers (and experts) on leading axes; HF stores one tensor per layer (and per expert), as
`torch.nn.Linear` weights ([out, in]).

This module knows HF's legacy per-expert layout, which transformers v4 and v5 both write by
default; other layouts (v5 fused experts, Mistral's own formats) are translated into these keys by
the conversion tool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from mixtral_jax.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our leaves and the HF tensors it is stacked from.

    Attributes:
      path: our leaf, e.g. ("layers", "moe", "w_gate").
      hf_key: HF key template with `{layer}` / `{expert}` fields for stacked leaves.
      to_ours: HF slice -> our slice (shapes need the config).
      to_hf: our slice -> HF slice.
    """

    path: Path
    hf_key: str
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_key

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.hf_key


def _same(w, cfg):
    return w


def _transpose(w, cfg):
    return transpose(w)


def transpose(w: np.ndarray, rows: int = 256) -> np.ndarray:
    """w.T made contiguous, in bands of `rows` source rows (cache-friendly: 2.4x numpy's plain
    transpose on a 14336 x 4096 bf16 matrix)."""
    if w.ndim != 2:
        return np.ascontiguousarray(w.T)
    out = np.empty(w.shape[::-1], w.dtype)
    for start in range(0, w.shape[0], rows):
        out[:, start : start + rows] = w[start : start + rows].T
    return out


def _heads_in(num_heads_of: Callable[[ModelConfig], int]):
    """HF [heads*H, D] -> ours [D, heads, H] (q/k/v projections), and back."""

    def to_ours(w, cfg):
        return np.ascontiguousarray(w.T.reshape(cfg.embed_dim, num_heads_of(cfg), cfg.head_dim))

    def to_hf(w, cfg):
        return np.ascontiguousarray(w.reshape(cfg.embed_dim, -1).T)

    return to_ours, to_hf


def _o_to_ours(w, cfg):  # HF [D, N*H] -> ours [N, H, D]
    return np.ascontiguousarray(w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.embed_dim))


def _o_to_hf(w, cfg):  # ours [N, H, D] -> HF [D, N*H]
    return np.ascontiguousarray(w.reshape(-1, cfg.embed_dim).T)


_q = _heads_in(lambda c: c.num_heads)
_kv = _heads_in(lambda c: c.num_kv_heads)
_LAYER = "model.layers.{layer}."
_EXPERT = _LAYER + "block_sparse_moe.experts.{expert}."

TABLE: tuple[TensorMap, ...] = (
    TensorMap(("embed", "embedding"), "model.embed_tokens.weight", _same, _same),
    TensorMap(("layers", "attn_norm", "scale"), _LAYER + "input_layernorm.weight", _same, _same),
    TensorMap(("layers", "attn", "q_proj"), _LAYER + "self_attn.q_proj.weight", *_q),
    TensorMap(("layers", "attn", "k_proj"), _LAYER + "self_attn.k_proj.weight", *_kv),
    TensorMap(("layers", "attn", "v_proj"), _LAYER + "self_attn.v_proj.weight", *_kv),
    TensorMap(
        ("layers", "attn", "o_proj"), _LAYER + "self_attn.o_proj.weight", _o_to_ours, _o_to_hf
    ),
    TensorMap(
        ("layers", "moe_norm", "scale"), _LAYER + "post_attention_layernorm.weight", _same, _same
    ),
    TensorMap(
        ("layers", "moe", "router"), _LAYER + "block_sparse_moe.gate.weight", _transpose, _transpose
    ),
    TensorMap(("layers", "moe", "w_gate"), _EXPERT + "w1.weight", _transpose, _transpose),
    TensorMap(("layers", "moe", "w_up"), _EXPERT + "w3.weight", _transpose, _transpose),
    TensorMap(("layers", "moe", "w_down"), _EXPERT + "w2.weight", _transpose, _transpose),
    TensorMap(("final_norm", "scale"), "model.norm.weight", _same, _same),
    TensorMap(("lm_head",), "lm_head.weight", _transpose, _transpose),
)


def slice_keys(m: TensorMap, cfg: ModelConfig) -> list[tuple[tuple[int, ...], str]]:
    """(index into our leaf, HF key) for every HF slice of leaf `m`, in stacking order."""
    layers = range(cfg.num_layers) if m.per_layer else [None]
    experts = range(cfg.num_experts) if m.per_expert else [None]
    out = []
    for i in layers:
        for e in experts:
            index = tuple(x for x in (i, e) if x is not None)
            out.append((index, m.hf_key.format(layer=i, expert=e)))
    return out


def hf_keys(cfg: ModelConfig) -> list[str]:
    """Every key of a legacy-layout HF Mixtral state dict for `cfg`."""
    return [key for m in TABLE for _, key in slice_keys(m, cfg)]


def leaf_from_hf(m: TensorMap, get: Callable[[str], np.ndarray], cfg: ModelConfig) -> np.ndarray:
    """Our stacked leaf for row `m`, reading each HF slice through `get(key)`."""
    slices = [m.to_ours(np.asarray(get(key)), cfg) for _, key in slice_keys(m, cfg)]
    if not (m.per_layer or m.per_expert):
        return slices[0]
    leading = (cfg.num_layers,) * m.per_layer + (cfg.num_experts,) * m.per_expert
    return np.stack(slices).reshape(leading + slices[0].shape)


def params_from_hf(state: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Our nested parameter dict (plain numpy leaves) from an HF legacy-layout state dict."""
    params: dict = {}
    for m in TABLE:
        node = params
        for name in m.path[:-1]:
            node = node.setdefault(name, {})
        node[m.path[-1]] = leaf_from_hf(m, state.__getitem__, cfg)
    return params


def params_to_hf(params: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, HF tensor) pairs from our nested parameter dict, one slice at a time."""
    for m in TABLE:
        leaf = params
        for name in m.path:
            leaf = leaf[name]
        for index, key in slice_keys(m, cfg):
            yield key, m.to_hf(np.asarray(leaf[index] if index else leaf), cfg)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF legacy key -> tensor shape ([out, in] for matrices) of every tensor for `cfg`."""
    d, f, v, e = cfg.embed_dim, cfg.hidden_dim, cfg.vocab_size, cfg.num_experts
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    by_leaf = {
        ("embed", "embedding"): (v, d),
        ("layers", "attn_norm", "scale"): (d,),
        ("layers", "attn", "q_proj"): (q, d),
        ("layers", "attn", "k_proj"): (kv, d),
        ("layers", "attn", "v_proj"): (kv, d),
        ("layers", "attn", "o_proj"): (d, q),
        ("layers", "moe_norm", "scale"): (d,),
        ("layers", "moe", "router"): (e, d),
        ("layers", "moe", "w_gate"): (f, d),
        ("layers", "moe", "w_up"): (f, d),
        ("layers", "moe", "w_down"): (d, f),
        ("final_norm", "scale"): (d,),
        ("lm_head",): (v, d),
    }
    return {key: by_leaf[m.path] for m in TABLE for _, key in slice_keys(m, cfg)}
