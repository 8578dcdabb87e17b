"""The one grouped-matmul entry point of the dropless MoE path.

`grouped_matmul(lhs, rhs, group_sizes, impl)` multiplies consecutive row groups of `lhs` by their
own matrix of `rhs`. Everything the dropless path needs from a kernel goes through here, and the
kernel is the one the kernel plan resolved from `ComputeConfig.gmm_impl` (`kernels/plan.py`):

  pallas    our Pallas-Triton kernels with a custom VJP (`gmm_pallas.py`): NVIDIA GPUs. XLA's
            ragged_dot runs every expert densely there (8x the FLOPs for Mixtral).
  megablox  JAX's shipped TPU kernels with a custom VJP (`gmm_megablox.py`), as MaxText trains
            Mixtral on TPU; on any other platform (CPU) they run in Pallas' interpreter.
  xla       `jax.lax.ragged_dot`: CPU (and TPU when asked for).
  auto    resolved here by `kernel_plan.resolve_gmm` (direct callers: benchmarks, tests).

`rhs` may be a `quant.QuantizedWeight` (int8 / int4 experts): under pallas the quantized kernel
reads its codes (`gmm_quant.gmm`, `gmm_quant.gmm_stacked`; the kernel plan picks pallas for
quantized experts only where `weight_tiles.supports_format` holds), under xla / megablox
the weight (one layer of a stack) is dequantized to lhs's dtype for the float kernel. Either
way a quantized weight is a frozen base (QLoRA): the product has a gradient in lhs only,
d lhs = d y W^T, and its backward dequantizes the weight again rather than keeping the
dequantized copy as a residual (`_dequantized_gmm`; a layer scan would otherwise hold every
layer's copy until the backward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.config import GmmImpl
from mixtral_jax.kernels import gmm_megablox, gmm_pallas, gmm_quant, gmm_swiglu
from mixtral_jax.kernels.plan import platform, resolve_gmm
from mixtral_jax.kernels.quant import QuantizedWeight


def _resolved(impl: GmmImpl | str, dtype) -> GmmImpl:
    """The plan's choice as given; only `auto` (direct callers) is resolved here."""
    impl = GmmImpl(impl)
    return resolve_gmm(impl, dtype=dtype) if impl == GmmImpl.AUTO else impl


def _interpret() -> bool:
    """megablox is compiled (Mosaic) on TPU and interpreted elsewhere (the plan lets only CPU
    through)."""
    return platform() != "tpu"


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: GmmImpl | str = GmmImpl.AUTO
) -> jax.Array:
    """Rows [start_e, start_e + group_sizes[e]) of lhs times rhs[e], for every group e.

    Args:
      lhs: [A, D] rows sorted by group (A = assignments, D = contraction width).
      rhs: [E, D, F] one matrix per group, in lhs's dtype, or a QuantizedWeight.
      group_sizes: [E] int32, summing to at most A; rows past the sum come out as zeros.
      impl: see the module docstring.
    Returns:
      [A, F] in lhs's dtype.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    impl = _resolved(impl, lhs.dtype)
    if isinstance(rhs, QuantizedWeight):
        if impl == GmmImpl.PALLAS:
            return gmm_quant.gmm(lhs, rhs, group_sizes)
        return _dequantized_gmm(impl, rhs.bits, lhs, rhs.codes, rhs.scale, group_sizes)
    return _float_gmm(lhs, rhs, group_sizes, impl)


def weight_gradient_in_weight_dtype(impl: GmmImpl | str) -> bool:
    """Whether the grouped matmul `impl` (resolved) is a kernel that writes its weights'
    gradient in the weights' dtype (pallas's and megablox's tgmm); `jax.lax.ragged_dot` is an
    XLA op, whose rounding XLA may elide (in the whole model on the CPU, expert weights cast
    from float32 get their gradient unrounded)."""
    return GmmImpl(impl) in (GmmImpl.PALLAS, GmmImpl.MEGABLOX)


def _float_gmm(lhs, rhs, group_sizes, impl: GmmImpl):
    if impl == GmmImpl.PALLAS:
        return gmm_pallas.gmm(lhs, rhs.astype(lhs.dtype), group_sizes)
    if impl == GmmImpl.MEGABLOX:
        return gmm_megablox.gmm(lhs, rhs.astype(lhs.dtype), group_sizes, _interpret())
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def grouped_swiglu(
    lhs: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    group_sizes: jax.Array,
    impl: GmmImpl | str = GmmImpl.AUTO,
) -> jax.Array:
    """silu(lhs @ w_gate[e]) * (lhs @ w_up[e]) per row group: under pallas one fused kernel
    (`gmm_swiglu.py`, SwiGLU in the epilogue), else two `grouped_matmul`s and the SwiGLU.

    lhs: [A, D] sorted rows; w_gate, w_up: [E, D, F] float weights -> [A, F] in lhs's dtype.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    impl = _resolved(impl, lhs.dtype)
    if impl == GmmImpl.PALLAS:
        return gmm_swiglu.gmm_swiglu(
            lhs, w_gate.astype(lhs.dtype), w_up.astype(lhs.dtype), group_sizes
        )
    gate = grouped_matmul(lhs, w_gate, group_sizes, impl)
    return jax.nn.silu(gate) * grouped_matmul(lhs, w_up, group_sizes, impl)


def grouped_expert_ffn(
    lhs: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    group_sizes: jax.Array,
    impl: GmmImpl | str = GmmImpl.AUTO,
) -> jax.Array:
    """(silu(lhs W_gate[e]) * (lhs W_up[e])) W_down[e] per row group: under pallas the fused
    kernels (`gmm_swiglu.expert_ffn`: SwiGLU in the gate/up epilogue, its backward in the
    epilogue of d h), else `grouped_swiglu` and a `grouped_matmul`.

    lhs: [A, D] sorted rows; w_gate, w_up: [E, D, F]; w_down: [E, F, D] -> [A, D] in lhs's dtype.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    impl = _resolved(impl, lhs.dtype)
    if impl == GmmImpl.PALLAS:
        ws = (w.astype(lhs.dtype) for w in (w_gate, w_up, w_down))
        return gmm_swiglu.expert_ffn(lhs, *ws, group_sizes)
    h = grouped_swiglu(lhs, w_gate, w_up, group_sizes, impl)
    return grouped_matmul(h, w_down, group_sizes, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dequantized_gmm(impl, bits, lhs, codes, scale, group_sizes):
    """The float kernel on the weight dequantized to lhs's dtype; gradient in lhs alone."""
    w = QuantizedWeight(codes, scale, bits).dequantize(lhs.dtype)  # [E, D, F]
    return _float_gmm(lhs, w, group_sizes, impl)


def _dequantized_gmm_fwd(impl, bits, lhs, codes, scale, group_sizes):
    out = _dequantized_gmm(impl, bits, lhs, codes, scale, group_sizes)
    return out, (codes, scale, group_sizes)


def _dequantized_gmm_bwd(impl, bits, residuals, dy):
    codes, scale, group_sizes = residuals
    w = QuantizedWeight(codes, scale, bits).dequantize(dy.dtype)  # again: [E, D, F]
    d_lhs = _float_gmm(dy, jnp.swapaxes(w, -1, -2), group_sizes, impl)  # d y W^T: [A, D]
    return d_lhs, None, jnp.zeros_like(scale), None


_dequantized_gmm.defvjp(_dequantized_gmm_fwd, _dequantized_gmm_bwd)


def grouped_matmul_stacked(
    lhs: jax.Array,
    stack: jax.Array,
    group_sizes: jax.Array,
    layer: jax.Array,
    impl: GmmImpl | str = GmmImpl.AUTO,
) -> jax.Array:
    """`grouped_matmul(lhs, stack[layer], group_sizes)` for inference inside a layer scan.

    stack: [L, E, D, F]; layer: int32 scalar. The Pallas and megablox kernels read the layer
    where it lies: slicing it out for a custom call would copy it (2.8 GB per 8x7B layer and
    decode step). No gradient through the stack.
    """
    group_sizes = group_sizes.astype(jnp.int32)
    impl = _resolved(impl, lhs.dtype)
    if isinstance(stack, QuantizedWeight):
        if impl == GmmImpl.PALLAS:
            return gmm_quant.gmm_stacked(lhs, stack, group_sizes, layer)
        return grouped_matmul(lhs, stack[layer].dequantize(lhs.dtype), group_sizes, impl)
    if impl == GmmImpl.PALLAS:
        return gmm_pallas.gmm_stacked(lhs, stack.astype(lhs.dtype), group_sizes, layer)
    if impl == GmmImpl.MEGABLOX:
        stack = stack.astype(lhs.dtype)
        return gmm_megablox.gmm_stacked(lhs, stack, group_sizes, layer, _interpret())
    return jax.lax.ragged_dot(lhs, stack[layer], group_sizes)
