"""What a run trains: everything (the default), LoRA adapters over a frozen base
(`train.lora_rank` > 0), or the parts of the model that `train.trainable` patterns select.
Over a quantized base (int8 / int4 experts or projections) only LoRA adapters, or float parts
that patterns select, train: the codes and scales are frozen (`check_quantized`).

The run's state (`TrainState.params`, the optimizer state, the checkpoints) holds only what
trains; the frozen rest is an input of the compiled step, never differentiated, never updated
and never saved with the run (it is the starting checkpoint, or the seed's initialisation, again
on resume). `Partition.join` rebuilds the model's state from the two at the top of the forward.

`train.trainable` grammar: a pattern is dot-separated components matched against the names of
the model's parts, one component each; `*` matches any one component, and a pattern that stops
early selects everything under what it names. The parts:

  embed.embedding   final_norm.scale   lm_head
  layers.<l>.attn.{q_proj,k_proj,v_proj,o_proj}   layers.<l>.{attn_norm,moe_norm}.scale
  layers.<l>.moe.router   layers.<l>.moe.experts[<e>].{w_gate,w_up,w_down}

so `layers.*.moe.experts[3]` is expert 3 (its three matrices) in every layer, `layers.0.attn` the
first layer's projections, `layers.*.moe.router` every router. A pattern that selects nothing is
a ConfigError naming it. A selected slice of a stacked weight ([L, ...] or [L, E, ...]) is its
own leaf [n, ...] in the state (n selected layers, or (layer, expert) pairs), so the optimizer
keeps moments for exactly the selected slices; joining writes them over the frozen stack.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig
from mixtral_jax.model import lora
from mixtral_jax.model.params import abstract, param_shapes
from mixtral_jax.model.quantized import quantized_leaves
from mixtral_jax.parallel.sharding import SCALE_SUFFIX

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def _matches(pattern: tuple[str, ...], part: tuple[str, ...]) -> bool:
    if len(pattern) > len(part):
        return False
    return all(p in ("*", q) for p, q in zip(pattern, part, strict=False))


def _parts(shapes: dict):
    """(part name components, leaf path, flat row of the leaf's stacked axes or None) for
    every selectable part of a parameter tree shaped like `param_shapes`."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(k.key for k in path)
        if keys[0] != "layers":
            yield keys, keys, None
            continue
        num_layers = leaf.shape[0]
        for layer in range(num_layers):
            if _is_expert(keys):
                num_experts = leaf.shape[1]
                for e in range(num_experts):
                    name = ("layers", str(layer), "moe", f"experts[{e}]", keys[-1])
                    yield name, keys, layer * num_experts + e
            else:
                yield ("layers", str(layer), *keys[1:]), keys, layer


def _get(tree: dict, keys: tuple[str, ...]):
    for k in keys:
        tree = tree[k]
    return tree


def _set(tree: dict, keys: tuple[str, ...], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def select(shapes: dict, patterns: tuple[str, ...]) -> dict[tuple[str, ...], np.ndarray | None]:
    """{leaf path: sorted flat rows selected (None = the whole leaf)} for `patterns`.

    Raises:
      ConfigError: a pattern selects nothing (named, with the part names to choose from).
    """
    parts = list(_parts(shapes))
    chosen: dict[tuple[str, ...], set] = {}
    for text in patterns:
        pattern = tuple(text.split("."))
        hits = [(keys, row) for name, keys, row in parts if _matches(pattern, name)]
        if not hits:
            raise ConfigError(
                f"train.trainable: {text!r} selects nothing (parts look like embed.embedding, "
                "layers.<l>.attn.q_proj, layers.<l>.moe.router, layers.<l>.moe.experts[<e>])"
            )
        for keys, row in hits:
            chosen.setdefault(keys, set()).add(row)
    out = {}
    for keys, rows in chosen.items():
        leaf = _get(shapes, keys)
        whole = None in rows or len(rows) == _stacked_rows(keys, leaf)
        out[keys] = None if whole else np.array(sorted(rows), np.int32)
    return out


def _is_expert(keys) -> bool:
    return keys[-2:-1] == ("moe",) and keys[-1] in _EXPERT_WEIGHTS


def _stacked_rows(keys, leaf) -> int:
    return leaf.shape[0] * leaf.shape[1] if _is_expert(keys) else leaf.shape[0]


def _rows_view(keys, x):
    """The leaf as [rows, ...] over its stacked axes: [L*E, ...] for expert weights, else [L, ...]."""
    return x.reshape(-1, *x.shape[2 if _is_expert(keys) else 1 :])


@dataclasses.dataclass(frozen=True)
class Partition:
    """How the model's state splits into what trains and what stays frozen.

    Attributes:
      lcfg: LoRA adapters train (the base is frozen), or None.
      rows: without LoRA, the selected leaves: {leaf path: flat rows, None = whole leaf}.
    """

    lcfg: lora.LoraConfig | None
    rows: dict

    def train_part(self, params: dict, model_cfg: ModelConfig, seed: int) -> dict:
        """What trains, from the full parameters (LoRA: fresh adapters from `seed`)."""
        if self.lcfg is not None:
            return lora.init_adapters(model_cfg, self.lcfg, seed)
        out: dict = {}
        for keys, rows in self.rows.items():
            leaf = _get(params, keys)
            _set(out, keys, leaf if rows is None else _rows_view(keys, leaf)[rows])
        return out

    def join(self, train: dict, frozen: dict) -> dict:
        """The model's whole state (for `nnx.merge`) from the trained and the frozen parts."""
        if self.lcfg is not None:
            return lora.join(frozen, train)
        out = jax.tree.map(lambda x: x, frozen)
        for keys, rows in self.rows.items():
            new = _get(train, keys)
            if rows is not None:
                old = _get(frozen, keys)
                new = _rows_view(keys, old).at[rows].set(new.astype(old.dtype)).reshape(old.shape)
            _set(out, keys, new)
        return out


def check_quantized(tc, model_cfg: ModelConfig, where: str = "the model") -> None:
    """Over quantized weights (`model_cfg.quantized`) only LoRA trains (QLoRA): the integer codes
    and their scales stay frozen. `where` names the weights' source in the message.

    Raises:
      ConfigError: full fine-tuning (train.lora_rank 0, no train.trainable) over quantized
        weights, or a train.trainable pattern that selects a quantized weight (named).
    """
    if not model_cfg.quantized or tc.lora_rank:
        return
    bits = f"expert_bits={model_cfg.expert_bits}, attention_bits={model_cfg.attention_bits}"
    if not tc.trainable:
        raise ConfigError(
            f"train.lora_rank=0: full fine-tuning cannot train the quantized weights of {where} "
            f"({bits}); set train.lora_rank > 0 (LoRA over the frozen quantized base) or start "
            "from the float checkpoint"
        )
    frozen = {
        ("layers", module, n + s)
        for module, n in quantized_leaves(model_cfg)
        for s in ("", SCALE_SUFFIX)
    }
    shapes = param_shapes(model_cfg)
    for text in tc.trainable:
        hit = sorted(keys for keys in select(shapes, (text,)) if keys in frozen)
        if hit:
            raise ConfigError(
                f"train.trainable: {text!r} selects {'.'.join(hit[0])}, stored quantized in "
                f"{where} ({bits}): quantized weights cannot train; train LoRA adapters over "
                "them (train.lora_rank > 0) or start from the float checkpoint"
            )


def partition(tc, model_cfg: ModelConfig) -> Partition | None:
    """The run's partition from its TrainConfig (None: everything trains, today's path).

    Raises:
      ConfigError: a LoRA rank too large for a target, a pattern selecting nothing, or
        anything but LoRA training quantized weights (`check_quantized`).
    """
    check_quantized(tc, model_cfg)
    if tc.lora_rank:
        lcfg = lora_config(tc)
        lora.adapter_shapes(model_cfg, lcfg)  # the rank fits every target
        return Partition(lcfg=lcfg, rows={})
    if tc.trainable:
        return Partition(lcfg=None, rows=select(param_shapes(model_cfg), tc.trainable))
    return None


def lora_config(tc) -> lora.LoraConfig:
    return lora.LoraConfig(rank=tc.lora_rank, alpha=tc.lora_alpha, targets=tc.lora_targets)


def state_bytes(tree) -> tuple[int, int]:
    """(leaves, bytes) of the array leaves of a pytree (an optimizer state, say)."""
    leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and x.ndim >= 0]
    return len(leaves), sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def abstract_model(model_cfg: ModelConfig, part: Partition | None):
    """The abstract model whose graphdef the run merges: with adapters for a LoRA run."""
    model = abstract(model_cfg)
    if part is not None and part.lcfg is not None:
        shapes = lora.adapter_shapes(model_cfg, part.lcfg)
        leaf = lambda s: jax.ShapeDtypeStruct(s, jnp.float32)
        lora.attach(model, part.lcfg, jax.tree.map(leaf, shapes, is_leaf=_is_shape))
    return model


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _replicated(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def train_shapes(part: Partition, shapes: dict, model_cfg: ModelConfig, seed: int, mesh) -> dict:
    """ShapeDtypeStructs of what trains, replicated on `mesh` (adapters and selected slices
    are small beside the model; a selected whole leaf keeps its parameter's sharding)."""
    out = jax.eval_shape(lambda p: part.train_part(p, model_cfg, seed), shapes)
    where = _train_shardings(part, out, shapes, mesh)
    return jax.tree.map(lambda x, w: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=w), out, where)


def _train_shardings(part: Partition, train: dict, shapes: dict, mesh) -> dict:
    def one(path, x):
        keys = tuple(k.key for k in path)
        if part.lcfg is None and part.rows.get(keys, 0) is None:
            return _get(shapes, keys).sharding
        return _replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, train)


def place_train_part(part: Partition, params: dict, model_cfg: ModelConfig, seed: int, mesh):
    """What trains, cut from (or, LoRA, drawn beside) the placed full parameters."""
    where = _train_shardings(part, train_shapes(part, params, model_cfg, seed, mesh), params, mesh)
    return jax.jit(lambda p: part.train_part(p, model_cfg, seed), out_shardings=where)(params)


def check_same_base(saved: dict | None, cfg, step: int) -> None:
    """A run that trains part of the model reads its frozen rest from checkpoint.init_from
    again on resume: refuse another one (the saved state would meet a different base)."""
    before = ((saved or {}).get("checkpoint") or {}).get("init_from", cfg.checkpoint.init_from)
    if before != cfg.checkpoint.init_from:
        raise ConfigError(
            f"checkpoint.init_from={cfg.checkpoint.init_from!r}: step {step} of this run trained "
            f"over the frozen weights of {before!r}; resume with that one"
        )
