"""LoRA adapters: low-rank trainable factors beside a frozen base.

A target weight W keeps its checkpoint dtype and never trains; its adapter is two factors A, B
(`Adapter` variables, not `nnx.Param`, so `params.get_params` and every checkpoint of the base
leave them out) and the layer computes x W + (x A) B * (alpha / r). B starts at zero, so a model
with fresh adapters computes exactly the base's logits. The base weight is read where it always
was; only the low-rank term is added. A quantized base (int8 / int4 experts or projections,
QLoRA) is read the same way: its kernels, or one layer dequantized inside the layer scan, with
a gradient in the activations alone (`model/quantized.py`); its adapters are never merged into
its codes (inference keeps them as factors; `surgery merge-lora` writes a dequantized float
model).

Targets and factor shapes per layer (every factor also has the leading [L] axis of the stack):

  q_proj [D, N, H]   A [D, r]        B [r, N, H]      (k_proj, v_proj [D, K, H] alike)
  o_proj [N, H, D]   A [N, H, r]     B [r, D]
  router [D, E]      A [D, r]        B [r, E]
  w_gate [E, D, F]   A [E, D, r]     B [E, r, F]      per expert (w_up alike)
  w_down [E, F, D]   A [E, F, r]     B [E, r, D]

Where they run: attention projections and the router add the term after whichever kernel
computed x W (the decode kernels too: the term is linear). The experts' term runs through the
same grouped matmul as the base on the sorted rows of the dropless path (`moe/lora.py`); every
other dispatch (dense oracle, capacity, gathered, expert-parallel, the Pallas decode-expert
kernel, which fuses the SwiGLU) runs on the weights merged for the call, W + A B * alpha / r
(a quantized layer dequantized to the compute dtype first), except a decode call over
quantized stacks under the pallas grouped matmul: that one takes the dropless path too, the
base's products reading codes in place (a merge would dequantize every layer each step).

Adapters travel as a nested dict shaped like the model's (`layers.attn.lora_q_proj_a` ...).
Letters as in `transformer.py`; r the rank.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ConfigError, DecodeExpertImpl, GmmImpl, ModelConfig, MoEImpl
from mixtral_jax.kernels.quant import QuantizedWeight
from mixtral_jax.moe.lora import moe_dropless_lora
from mixtral_jax.moe.ops import route_logits

# target -> (submodule of a decoder block, leading per-expert axes, contracted axes)
TARGETS = {
    "q_proj": ("attn", 0, 1),
    "k_proj": ("attn", 0, 1),
    "v_proj": ("attn", 0, 1),
    "o_proj": ("attn", 0, 2),
    "router": ("moe", 0, 1),
    "w_gate": ("moe", 1, 1),
    "w_up": ("moe", 1, 1),
    "w_down": ("moe", 1, 1),
}
EXPERT_TARGETS = ("w_gate", "w_up", "w_down")
SCALE_ATTR = "lora_scale"


class Adapter(nnx.Variable):
    """A LoRA factor: trains while the base `nnx.Param`s stay frozen."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Attributes:
    rank: r, the inner width of every adapter (>= 1).
    alpha: the term is scaled by alpha / r (so changing r keeps the update's size).
    targets: weights that get adapters, names from `TARGETS`.
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"train.lora_rank={self.rank!r}: must be an integer >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"train.lora_alpha={self.alpha!r}: must be > 0 and finite")
        if not self.targets:
            raise ConfigError("train.lora_targets=[]: name at least one of " + ", ".join(TARGETS))
        for t in self.targets:
            if t not in TARGETS:
                raise ConfigError(
                    f"train.lora_targets: {t!r} is no LoRA target; targets: {', '.join(TARGETS)}"
                )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"train.lora_targets={list(self.targets)}: a target is repeated")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def factor_names(target: str) -> tuple[str, str]:
    return f"lora_{target}_a", f"lora_{target}_b"


def _base_shape(cfg: ModelConfig, target: str) -> tuple[int, ...]:
    """The target weight's shape in one layer."""
    d, e, f = cfg.embed_dim, cfg.num_experts, cfg.hidden_dim
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {
        "q_proj": (d, n, h),
        "k_proj": (d, k, h),
        "v_proj": (d, k, h),
        "o_proj": (n, h, d),
        "router": (d, e),
        "w_gate": (e, d, f),
        "w_up": (e, d, f),
        "w_down": (e, f, d),
    }[target]


def adapter_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict:
    """{"layers": {"attn"|"moe": {factor name: [L, ...] shape tuple}}}.

    Raises:
      ConfigError: the rank exceeds a target's smaller side (the factors would not be low-rank).
    """
    out: dict = {"layers": {}}
    for target in lcfg.targets:
        module, batch, contracted = TARGETS[target]
        shape = _base_shape(cfg, target)
        lead, inner, outer = (
            shape[:batch],
            shape[batch : batch + contracted],
            shape[batch + contracted :],
        )
        limit = min(math.prod(inner), math.prod(outer))
        if lcfg.rank > limit:
            raise ConfigError(
                f"train.lora_rank={lcfg.rank}: exceeds {target}'s smaller side {limit} "
                f"(its shape per layer is {shape})"
            )
        a, b = factor_names(target)
        layers = (cfg.num_layers,)
        out["layers"].setdefault(module, {})[a] = layers + lead + inner + (lcfg.rank,)
        out["layers"][module][b] = layers + lead + (lcfg.rank,) + outer
    return out


def init_adapters(cfg: ModelConfig, lcfg: LoraConfig, seed: int, dtype=jnp.float32) -> dict:
    """Fresh adapters: A ~ N(0, 1 / fan_in) (fan_in = the contracted width), B = 0."""
    shapes = adapter_shapes(cfg, lcfg)
    key = jax.random.key(seed)
    out: dict = {"layers": {}}
    for i, target in enumerate(lcfg.targets):
        module, batch, _ = TARGETS[target]
        a, b = factor_names(target)
        a_shape, b_shape = shapes["layers"][module][a], shapes["layers"][module][b]
        fan_in = math.prod(a_shape[1 + batch : -1])
        draw = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32)
        out["layers"].setdefault(module, {})[a] = (draw / math.sqrt(fan_in)).astype(dtype)
        out["layers"][module][b] = jnp.zeros(b_shape, dtype)
    return out


def attach(model, lcfg: LoraConfig, adapters: dict) -> None:
    """Adds `adapters` (shaped like `adapter_shapes`; arrays or ShapeDtypeStructs) to `model`'s
    stacked decoder blocks as `Adapter` variables, and the scale alpha / r to the modules."""
    for module_name, factors in adapters["layers"].items():
        module = getattr(model.layers, module_name)
        for name, value in factors.items():
            setattr(module, name, Adapter(value))
        setattr(module, SCALE_ATTR, lcfg.scale)


def get_adapters(model) -> dict:
    """The model's adapters as a nested dict ({} when it has none)."""
    return nnx.to_pure_dict(nnx.state(model, Adapter))


def join(params: dict, adapters: dict) -> dict:
    """The model's whole state as one nested dict: base parameters and adapters (disjoint)."""
    out = dict(params)
    for key, value in adapters.items():
        out[key] = join(params[key], value) if isinstance(value, dict) else value
    return out


def factors(module, target: str):
    """(A, B, scale) of `module`'s adapter on `target`, or None when it has none."""
    a, b = factor_names(target)
    if not hasattr(module, a):
        return None
    return getattr(module, a)[...], getattr(module, b)[...], getattr(module, SCALE_ATTR)


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """(x A) B * scale in x's dtype: x [..., *in], A [*in, r], B [r, *out] -> [..., *out]."""
    contracted = a.ndim - 1
    xa = jnp.tensordot(x, a.astype(x.dtype), axes=contracted)  # [..., r]
    return jnp.tensordot(xa, b.astype(x.dtype), axes=1) * jnp.asarray(scale, x.dtype)


def add(module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y = x W (any kernel) plus the adapter's term when `module` has one on `target`."""
    ab = factors(module, target)
    if ab is None:
        return y
    return y + low_rank(x, *ab).astype(y.dtype)


def delta(a: jax.Array, b: jax.Array, batch: int) -> jax.Array:
    """A B: [*lead, *in, r] x [*lead, r, *out] -> [*lead, *in, *out], `batch` leading axes
    shared (the layer and expert axes), float32."""
    letters = "abcdefghijklmnopq"
    lead, rest = letters[:batch], letters[batch:]
    n_in, n_out = a.ndim - batch - 1, b.ndim - batch - 1
    ins, outs = rest[:n_in], rest[n_in : n_in + n_out]
    spec = f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}"
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, batch: int):
    """W + A B * scale, computed in float32 and returned in W's dtype."""
    return (w.astype(jnp.float32) + scale * delta(a, b, batch)).astype(w.dtype)


def merge(params: dict, adapters: dict, lcfg: LoraConfig) -> dict:
    """Base parameters with every adapter folded in (W + A B * alpha / r): a plain model."""
    out = jax.tree.map(lambda x: x, params)
    for target in lcfg.targets:
        module, batch, _ = TARGETS[target]
        a, b = (adapters["layers"][module][n] for n in factor_names(target))
        w = out["layers"][module][target]
        out["layers"][module][target] = merged_weight(w, a, b, lcfg.scale, batch + 1)
    return out


def add_to_router(module, x: jax.Array, routing, topk: int):
    """`routing` re-decided from logits + the router adapter's term (float32), if any."""
    ab = factors(module, "router")
    if ab is None:
        return routing
    logits = routing.logits + low_rank(x.astype(jnp.float32), *ab)
    return route_logits(logits, topk)


def _layer_of(w, layer):
    if isinstance(w, QuantizedWeight):
        return w[layer]
    return jax.lax.dynamic_index_in_dim(w, layer, keepdims=False)


def expert_dispatch(plan, x, routing, weights, layer, module, dispatch):
    """The experts with their adapters (or `dispatch(x, routing, weights, layer)` without any).

    The local dropless path of a call that the plan runs through the grouped matmul adds the
    low-rank terms there (`moe_dropless_lora`); so does a decode call over quantized stacks
    where the grouped matmul reads codes in place (pallas: `gmm_quant.gmm_stacked`), instead
    of the decode-expert kernel. Every other path gets this layer's merged weights
    W + A B * s (the Pallas decode-expert kernel fuses the SwiGLU, so the term cannot be
    added after it; merging costs E * D * F * r * 2 FLOPs a projection, and a quantized layer
    is dequantized first).
    """
    found = {t: factors(module, t) for t in EXPERT_TARGETS}
    found = {t: ab for t, ab in found.items() if ab is not None}
    if not found:
        return dispatch(x, routing, weights, layer)
    scale = getattr(module, SCALE_ATTR)
    local = plan.moe == MoEImpl.DROPLESS and plan.expert_mesh is None
    codes_in_place = (
        layer is not None
        and plan.grouped_matmul == GmmImpl.PALLAS
        and isinstance(weights[0], QuantizedWeight)
    )
    if local and (plan.decode_experts == DecodeExpertImpl.OFF or codes_in_place):
        pairs = {t: ab[:2] for t, ab in found.items()}
        return moe_dropless_lora(
            x, routing, *weights, pairs, scale, gmm_impl=plan.grouped_matmul, layer=layer
        )
    if layer is not None:  # stacks [L, E, ...] -> this layer's [E, ...]
        weights = tuple(_layer_of(w, layer) for w in weights)
    # quantized stacks read in place by the plan's kernels (QLoRA decode): this layer's
    # weights dequantized to the compute dtype, merged, and dispatched as float weights
    weights = tuple(w.dequantize(x.dtype) if isinstance(w, QuantizedWeight) else w for w in weights)
    names = ("w_gate", "w_up", "w_down")
    weights = tuple(
        merged_weight(w, *found[n][:2], scale, 1) if n in found else w
        for n, w in zip(names, weights, strict=True)
    )
    return dispatch(x, routing, weights, None)
