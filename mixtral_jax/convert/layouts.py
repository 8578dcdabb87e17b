"""Stored checkpoint layouts, each translated to Hugging Face's legacy per-expert keys.

`hf/weights.TABLE` speaks the legacy keys (`model.layers.N.block_sparse_moe.experts.E.w1.weight`).
A `Layout` says, for a config, which tensors a directory of that layout must hold (name ->
shape) and how to cut each legacy tensor out of a stored one. Layouts:

  hf            legacy per-expert keys (what transformers v4 and v5 write by default)
  hf-fused      transformers v5 `save_original_format=False`: `mlp.gate.weight`,
                `mlp.experts.gate_up_proj` [E, 2F, D] (gate half first), `mlp.experts.down_proj`
                [E, D, F]
  mistral       mistral-inference `consolidated*` + `params.json`: `tok_embeddings`,
                `layers.N.attention.wq`, `layers.N.feed_forward.experts.E.w1`, ...
  mistral-stacked  the December-2023 release: `layers.N.block_sparse_moe.w1/w2/w3` [E*F, D]
                (w2 stored per expert as [F, D], i.e. transposed)

Mistral's own formats rotate interleaved pairs in RoPE; HF rotates halves. The q/k rows are
permuted so HF's rotate-half computes the same function (`mistral_to_hf_rows`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.fileio import read_json
from mixtral_jax.hf.config import from_hf_dict
from mixtral_jax.hf.weights import hf_shapes

Slicer = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Plan:
    """expected: stored name -> shape; sources: legacy key -> (stored name, slicer)."""

    expected: dict[str, tuple[int, ...]]
    sources: dict[str, tuple[str, Slicer]]


def mistral_to_hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Mistral wq/wk [heads*H, D] -> HF q/k_proj: per head, rows (0,1),(2,3).. -> halves."""
    hd, d = w.shape
    return np.ascontiguousarray(  # [heads, H/2, 2, D] -> [heads, 2, H/2, D]
        w.reshape(heads, hd // heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(hd, d)
    )


def hf_to_mistral_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `mistral_to_hf_rows`."""
    hd, d = w.shape
    return np.ascontiguousarray(  # [heads, 2, H/2, D] -> [heads, H/2, 2, D]
        w.reshape(heads, 2, hd // heads // 2, d).transpose(0, 2, 1, 3).reshape(hd, d)
    )


def _identity(a):
    return a


def _plan_hf(cfg: ModelConfig) -> Plan:
    shapes = hf_shapes(cfg)
    return Plan(dict(shapes), {k: (k, _identity) for k in shapes})


def _plan_hf_fused(cfg: ModelConfig) -> Plan:
    e, f, d = cfg.num_experts, cfg.hidden_dim, cfg.embed_dim
    expected, sources = {}, {}
    for key, shape in hf_shapes(cfg).items():
        if ".block_sparse_moe." not in key:
            expected[key], sources[key] = shape, (key, _identity)
    for i in range(cfg.num_layers):
        old, new = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        expected[new + "gate.weight"] = (e, d)
        sources[old + "gate.weight"] = (new + "gate.weight", _identity)
        expected[new + "experts.gate_up_proj"] = (e, 2 * f, d)
        expected[new + "experts.down_proj"] = (e, d, f)
        for x in range(e):
            gate_up, down = new + "experts.gate_up_proj", new + "experts.down_proj"
            sources[f"{old}experts.{x}.w1.weight"] = (gate_up, lambda a, x=x: a[x, :f])
            sources[f"{old}experts.{x}.w3.weight"] = (gate_up, lambda a, x=x: a[x, f:])
            sources[f"{old}experts.{x}.w2.weight"] = (down, lambda a, x=x: a[x])
    return Plan(expected, sources)


_MISTRAL_LAYER = {
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
}
_MISTRAL_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _plan_mistral(cfg: ModelConfig, stacked: bool) -> Plan:
    shapes = hf_shapes(cfg)
    e, f = cfg.num_experts, cfg.hidden_dim
    expected, sources = {}, {}
    for key, shape in shapes.items():
        if key in _MISTRAL_TOP:
            name, fn = _MISTRAL_TOP[key], _identity
        else:
            _, _, i, rest = key.split(".", 3)
            module = rest.removesuffix(".weight")
            moe = "block_sparse_moe" if stacked else "feed_forward"
            if module in _MISTRAL_LAYER:
                name, fn = f"layers.{i}.{_MISTRAL_LAYER[module]}.weight", _identity
                if module == "self_attn.q_proj":
                    fn = lambda a: mistral_to_hf_rows(a, cfg.num_heads)
                elif module == "self_attn.k_proj":
                    fn = lambda a: mistral_to_hf_rows(a, cfg.num_kv_heads)
            elif module == "block_sparse_moe.gate":
                name, fn = f"layers.{i}.{moe}.gate.weight", _identity
            elif not stacked:  # block_sparse_moe.experts.X.wN
                name, fn = f"layers.{i}.feed_forward.{module.split('.', 1)[1]}.weight", _identity
            else:
                _, _, x, w = module.split(".")
                x = int(x)
                name = f"layers.{i}.block_sparse_moe.{w}"
                fn = (
                    (lambda a, x=x: a[x * f : (x + 1) * f].T)
                    if w == "w2"
                    else (lambda a, x=x: a[x * f : (x + 1) * f])
                )
                expected[name] = (e * f, cfg.embed_dim)
                sources[key] = (name, fn)
                continue
        expected[name] = shape
        sources[key] = (name, fn)
    return Plan(expected, sources)


LAYOUTS = ("hf", "hf-fused", "mistral", "mistral-stacked")


def detect(keys) -> str | None:
    """The layout of a set of stored tensor names, or None when it is none of ours."""
    keys = set(keys)
    if any(k.endswith("mlp.experts.gate_up_proj") for k in keys):
        return "hf-fused"
    if any(k.startswith("model.") for k in keys):
        return "hf"
    if any(k.startswith("layers.") and ".block_sparse_moe.w1" in k for k in keys):
        return "mistral-stacked"
    if "tok_embeddings.weight" in keys or any(k.startswith("layers.") for k in keys):
        return "mistral"
    return None


def plan(layout: str, cfg: ModelConfig) -> Plan:
    if layout == "hf":
        return _plan_hf(cfg)
    if layout == "hf-fused":
        return _plan_hf_fused(cfg)
    return _plan_mistral(cfg, stacked=layout == "mistral-stacked")


# Mistral's native params.json keys (mistral-inference's ModelArgs); max_batch_size is a
# runtime setting of mistral-inference and is ignored.
_MISTRAL_KEYS = {
    "dim",
    "n_layers",
    "head_dim",
    "hidden_dim",
    "n_heads",
    "n_kv_heads",
    "norm_eps",
    "vocab_size",
    "rope_theta",
    "moe",
    "sliding_window",
    "_sliding_window",
    "max_seq_len",
    "max_batch_size",
}
_MISTRAL_MOE_KEYS = {"num_experts", "num_experts_per_tok"}


def mistral_params_config(path: str) -> ModelConfig:
    """Our config from Mistral's `params.json` (native names, or the HF names of Dec 2023).

    Native names are read strictly: an unknown key (top level or in "moe") is an error, as is a
    missing one (norm_eps included: no guessed default); `sliding_window` or its older spelling
    `_sliding_window` sets the attention window.

    Raises:
      ConfigError: one line naming the key.
    """
    p = read_json(path, "params.json")
    if not isinstance(p, dict):
        raise ConfigError(f"{path}: params.json is not a JSON object")
    if "dim" not in p:  # the Dec-2023 params.json uses HF's names
        return from_hf_dict(dict(p, model_type="mixtral"))
    unknown = sorted(set(p) - _MISTRAL_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (known: {sorted(_MISTRAL_KEYS)})")
    moe = p.get("moe")
    if not isinstance(moe, dict):
        raise ConfigError(f"{path} lacks 'moe' (an object with {sorted(_MISTRAL_MOE_KEYS)})")
    unknown = sorted(set(moe) - _MISTRAL_MOE_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key 'moe.{unknown[0]}' (known: {sorted(_MISTRAL_MOE_KEYS)})"
        )
    window = _mistral_window(p, path)
    try:
        hf = {
            "model_type": "mixtral",
            "hidden_size": p["dim"],
            "num_hidden_layers": p["n_layers"],
            "intermediate_size": p["hidden_dim"],
            "num_attention_heads": p["n_heads"],
            "num_key_value_heads": p.get("n_kv_heads", p["n_heads"]),
            "head_dim": p.get("head_dim"),
            "rms_norm_eps": p["norm_eps"],
            "vocab_size": p["vocab_size"],
            "rope_theta": p.get("rope_theta", 1e6),
            "num_local_experts": moe["num_experts"],
            "num_experts_per_tok": moe["num_experts_per_tok"],
            "sliding_window": window,
        }
    except KeyError as e:
        raise ConfigError(f"{path} lacks {e.args[0]!r}") from None
    if "max_seq_len" in p:
        hf["max_position_embeddings"] = p["max_seq_len"]
    return from_hf_dict(hf)


def _mistral_window(p: dict, path: str) -> int | None:
    """params.json's sliding window: `sliding_window`, or `_sliding_window` (older files)."""
    given = {k: p[k] for k in ("sliding_window", "_sliding_window") if p.get(k) is not None}
    if len(set(given.values())) > 1:
        raise ConfigError(
            f"{path}: sliding_window={given['sliding_window']} and "
            f"_sliding_window={given['_sliding_window']} disagree"
        )
    return next(iter(given.values()), None)


def source_config(directory: str, layout: str) -> ModelConfig:
    """The config of a source directory: params.json for Mistral layouts, else config.json."""
    from mixtral_jax.hf.config import load_hf_config

    if layout.startswith("mistral") and os.path.isfile(os.path.join(directory, "params.json")):
        return mistral_params_config(os.path.join(directory, "params.json"))
    return load_hf_config(directory)
