"""cuDNN flash attention that also returns each query's log-sum-exp, for attention in parts.

`jax.nn.dot_product_attention` returns the output only. Its cuDNN backend,
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, takes `return_residual=True`
and then returns (output, softmax statistics): the natural-log log-sum-exp of the scaled logits
of each query and head, float32, laid out [B, N, T] (its lowering's `softmax_stat_shape`, in jax
0.10.2 whatever the qkv layout; `bench/split_attention.py` checks it against the einsum on the
GPU). The module is private, so `lse_available` checks the signature this code calls, and the
kernel plan keeps the masked form (`model/attention.py::cached_flash_attention`) without it.

GQA rides through: the call checks only that keys and values have the same heads, and cuDNN
serves G query heads per kv head (N = K * G).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

_ARGUMENTS = ("q_seqlen", "kv_seqlen", "scale", "mask_type", "qkv_layout", "return_residual")
_MASKS = ("NO_MASK", "PADDING", "CAUSAL")


def _module():
    from jax._src.cudnn import fused_attention_stablehlo  # private: imported where used

    return fused_attention_stablehlo


@functools.cache
def lse_available() -> bool:
    """Whether this jax's cuDNN attention takes the arguments `attention_with_lse` passes
    (`return_residual` above all) and names the masks it uses. Reads a signature: no GPU."""
    try:
        module = _module()
        parameters = inspect.signature(module.dot_product_attention).parameters
        masks = {m.name for m in module.MaskType}
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return all(a in parameters for a in _ARGUMENTS) and all(m in masks for m in _MASKS)


def attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, *, kv_lengths: jax.Array | None, causal: bool
) -> tuple[jax.Array, jax.Array]:
    """cuDNN flash attention of q over k, v with each query's log-sum-exp.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], bf16 or fp16 (N a multiple of K).
      kv_lengths: [B] int32 or None: row b's queries see keys [0, kv_lengths[b]) only (the
        kernel skips the rest); must be >= 1.
      causal: query i sees keys j <= i (top-left aligned: right for T == S only).
    Returns:
      (out [B, T, N, H] in q's dtype, lse [B, T, N] float32: log sum_j exp(q.k_j / sqrt(H))).
    """
    module = _module()
    b, t, n, h = q.shape
    lengths = {}
    mask = module.MaskType.CAUSAL if causal else module.MaskType.NO_MASK
    if kv_lengths is not None:
        if causal:
            raise ValueError("attention_with_lse: kv_lengths with causal is not used here")
        mask = module.MaskType.PADDING
        lengths = {
            "q_seqlen": jnp.full((b,), t, jnp.int32),
            "kv_seqlen": jnp.asarray(kv_lengths, jnp.int32),
        }
    out, lse = module.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        **lengths,
        scale=h**-0.5,
        mask_type=mask,
        qkv_layout="BTNH",
        return_residual=True,
    )
    if lse.shape == (b, n, t):  # the statistics' layout in jax 0.10.2 (see the module doc)
        lse = jnp.swapaxes(lse, 1, 2)
    elif lse.shape != (b, t, n):
        raise ValueError(f"cuDNN log-sum-exp of shape {lse.shape}; expected [B, N, T] or [B, T, N]")
    return out, lse.astype(jnp.float32)
