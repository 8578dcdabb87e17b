"""Quantized weights as module parameters: the codes in the weight's own Param, scales beside it.

A weight W [..., K, N] (K the contraction) stored quantized (`kernels/quant.py`, int8 or int4,
`ModelConfig.expert_bits` / `attention_bits`) is two nnx.Params of its module:

  W         the integer codes: int8 [..., K, N], or int4 packed two per byte, uint8 [..., K/2, N]
  W_scale   the float scales [..., K/G, N] (float32 or bfloat16, `quant_scale_dtype`)

`read` joins them into a `quant.QuantizedWeight`. The codes keep their dtype: the compute dtype
applies to activations and to dequantized weights, never to the stored codes. Float weights
(bits 16) are a single Param, read as they are.

The dequantize path (`as_compute`) turns one layer into the compute dtype inside the layer
scan, never a whole [L, ...] stack: a cached call that reads stacks at `layer` gets that layer
as a one-layer stack [1, ...] and layer index 0.

Gradients (QLoRA: adapters training over a frozen quantized base). A quantized weight is a
frozen base: codes and scales get no gradient, the activations do. Autodiff through
`einsum(x, dequantize(W))` would keep the dequantized layer as the residual of d x = d y W^T,
so a layer scan without remat would hold every layer's dequantized weights at once until the
backward. `frozen_einsum` is that einsum with its own VJP instead: the residuals are the codes
and scales (scan inputs, read in place by the backward), and the backward dequantizes the layer
again for d x (one transient layer, the cost of one elementwise pass over the codes). Why this
and not remat of the dequantize alone: the product's own linearisation is what saves W, so only
owning the product's VJP keeps W out of the residuals without recomputing the forward matmul.
The experts' grouped matmul does the same on the local dropless path, the training default:
on CPU the float kernel on the dequantized matrix (`kernels/grouped_matmul.py`), on an H200
the kernel reading codes (`kernels/gmm_quant.py`: codes in the forward below 4,096 rows, else
dequantize + the bf16 kernel; the backward dequantizes + the transposed bf16 kernel). The other expert paths (dense, capacity,
expert-parallel, and the Pallas float kernel where the codes-reading one does not tile the
format) take the layer dequantized by `as_compute`: under remat "none" their backward
keeps that copy per layer, so train them with remat "full" or "save_dots".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.kernels import quant
from mixtral_jax.kernels.quant import QuantizedWeight
from mixtral_jax.parallel.sharding import SCALE_SUFFIX

Weight = jax.Array | QuantizedWeight


def store(module: nnx.Module, name: str, w: jax.Array, bits: int, group_size, scale_dtype) -> None:
    """Sets `module.name` to w [..., K, N] as a Param, quantized to `bits` unless 16."""
    if bits == 16:
        setattr(module, name, nnx.Param(w))
        return
    q = quant.quantize(w, bits, group_size, jnp.dtype(scale_dtype))
    setattr(module, name, nnx.Param(q.codes))
    setattr(module, name + SCALE_SUFFIX, nnx.Param(q.scale))


def read(module: nnx.Module, name: str, bits: int) -> Weight:
    """`module.name` as an array (bits 16) or a QuantizedWeight of its codes and scales."""
    w = getattr(module, name)[...]
    if bits == 16:
        return w
    return QuantizedWeight(w, getattr(module, name + SCALE_SUFFIX)[...], bits)


def as_compute(
    weights: tuple[Weight, ...], dtype, layer: jax.Array | None = None
) -> tuple[tuple[jax.Array, ...], jax.Array | int | None]:
    """Weights in the compute dtype, for the float kernels: (weights, layer).

    Without `layer` the weights are one layer's (the scan's slice) and are cast or dequantized
    whole. With `layer` they are every layer's stacks [L, ...]: if any needs a cast or a
    dequantize, layer `layer` is taken out as a one-layer stack [1, ...] and the returned layer
    is 0 (a whole-stack cast would copy the model); stacks already in `dtype` stay as they are.
    """
    dtype = jnp.dtype(dtype)
    if layer is not None and any(_needs_work(w, dtype) for w in weights):
        weights, layer = tuple(w[layer][None] for w in weights), 0
    return tuple(_in_dtype(w, dtype) for w in weights), layer


def frozen_einsum(spec: str, x: jax.Array, w: QuantizedWeight, shape, dtype) -> jax.Array:
    """einsum(spec, x, W) with W = dequantize(w) in `dtype`, reshaped to `shape` (a float
    layout, e.g. [D, N, H] of a stored [D, N*H]), differentiable in x alone (module doc).

    Args:
      spec: a two-operand einsum "x,w->out" in which every letter of x is also in w or in
        out (none summed over x alone), as the projections' "BTD,DNH->BTNH".
    """
    return _frozen_einsum(spec, tuple(shape), jnp.dtype(dtype), w.bits, x, w.codes, w.scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _frozen_einsum(spec, shape, dtype, bits, x, codes, scale):
    w = QuantizedWeight(codes, scale, bits).dequantize(dtype).reshape(shape)
    return jnp.einsum(spec, x, w)


def _frozen_einsum_fwd(spec, shape, dtype, bits, x, codes, scale):
    # x's dtype rides as a zero-size array: the backward returns d x in it
    return _frozen_einsum(spec, shape, dtype, bits, x, codes, scale), (codes, scale, x[:0])


def _frozen_einsum_bwd(spec, shape, dtype, bits, residuals, dy):
    codes, scale, x_like = residuals
    w = QuantizedWeight(codes, scale, bits).dequantize(dtype).reshape(shape)
    ins, out = spec.replace(" ", "").split("->")
    x_letters, w_letters = ins.split(",")
    dx = jnp.einsum(f"{out},{w_letters}->{x_letters}", dy, w)  # d y W^T
    return dx.astype(x_like.dtype), None, jnp.zeros_like(scale)


_frozen_einsum.defvjp(_frozen_einsum_fwd, _frozen_einsum_bwd)


def _needs_work(w: Weight, dtype) -> bool:
    return isinstance(w, QuantizedWeight) or w.dtype != dtype


def _in_dtype(w: Weight, dtype) -> jax.Array:
    return w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w.astype(dtype)


# ---- whole parameter trees: float <-> stored -----------------------------------------------
EXPERTS = ("w_gate", "w_up", "w_down")  # under layers.moe, [L, E, K, N]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")  # under layers.attn


def quantized_leaves(cfg) -> dict[tuple[str, str], int]:
    """(module, weight) under `layers` -> bits, for the weights `cfg` stores quantized."""
    out = {}
    if cfg.expert_bits < 16:
        out.update({("moe", name): cfg.expert_bits for name in EXPERTS})
    if cfg.attention_bits < 16:
        out.update({("attn", name): cfg.attention_bits for name in PROJECTIONS})
    return out


def to_matrix(name: str, w: jax.Array) -> jax.Array:
    """A float weight in its stored quantized layout (contraction first): attention projections
    [..., D, N, H] -> [..., D, N*H] and o_proj [..., N, H, D] -> [..., N*H, D]; experts as
    they are."""
    if name == "o_proj":
        return w.reshape(*w.shape[:-3], -1, w.shape[-1])
    if name in PROJECTIONS:
        return w.reshape(*w.shape[:-2], -1)
    return w


def quantize_weight(cfg, name: str, w: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of one float weight `name` (any leading stack axes) for `cfg`'s format."""
    q = quant.quantize(
        to_matrix(name, w), bits, cfg.quant_group_size, jnp.dtype(cfg.quant_scale_dtype)
    )
    return q.codes, q.scale


def quantize_params(params: dict, cfg) -> dict:
    """A float parameter tree (`params.get_params` of the float model) in the stored form of the
    quantized config `cfg` (every quantized weight -> codes W and scales W_scale). Whole leaves
    at once: for models that fit in memory (tests, the tiny model); the CLI streams slices."""
    layers = {module: dict(leaves) for module, leaves in params["layers"].items()}
    for (module, name), bits in quantized_leaves(cfg).items():
        codes, scale = quantize_weight(cfg, name, layers[module][name], bits)
        layers[module][name], layers[module][name + SCALE_SUFFIX] = codes, scale
    return {**params, "layers": layers}


def dequantize_params(params: dict, cfg, dtype="float32") -> dict:
    """The float parameter tree a quantized one stands for (codes * scales in `dtype`, float
    shapes): the weights of the dequantize-then-matmul oracle model."""
    layers = {module: dict(leaves) for module, leaves in params["layers"].items()}
    for (module, name), bits in quantized_leaves(cfg).items():
        codes = layers[module][name]
        scale = layers[module].pop(name + SCALE_SUFFIX)
        w = QuantizedWeight(codes, scale, bits).dequantize(jnp.dtype(dtype))
        stack = codes.shape[: codes.ndim - (3 if name in EXPERTS else 2)]  # the layer axes
        layers[module][name] = w.reshape(float_shape(cfg, name, stack))
    return {**params, "layers": layers}


def float_shape(cfg, name: str, stack: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The float shape of weight `name` (experts [E, D, F] ..., projections [D, N, H] ...)
    behind leading (layer) axes `stack`."""
    d, f, h = cfg.embed_dim, cfg.hidden_dim, cfg.head_dim
    n, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.num_experts
    shapes = {
        "q_proj": (d, n, h),
        "k_proj": (d, k, h),
        "v_proj": (d, k, h),
        "o_proj": (n, h, d),
        "w_gate": (e, d, f),
        "w_up": (e, d, f),
        "w_down": (e, f, d),
    }
    return (*stack, *shapes[name])


def float_config(cfg):
    """The same model with float weights (bits 16): what a quantized config was made from."""
    return cfg.replace(expert_bits=16, attention_bits=16, quant_group_size=None)
