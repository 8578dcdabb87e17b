"""Weight-only quantization: the stored format of int8 and int4 weights, and its exact inverse.

A weight [..., K, N] is read as x[M, K] @ w[K, N] (K the contraction, N the outputs: for the
experts K = D, N = F for w_gate / w_up and K = F, N = D for w_down). It is stored as integer
codes and one float scale per group of G consecutive rows of K and per output column:

  w[..., k, n] ~= code[..., k, n] * scale[..., k // G, n]

  int8  codes in [-127, 127], one int8 each: `codes` [..., K, N] int8. G = K by default (one
        scale per output channel), any G dividing K allowed.
  int4  codes in [-7, 7], two per byte: `codes` [..., K/2, N] uint8. Byte row i holds row i of
        K in its low nibble and row i + K/2 in its high nibble (two's complement nibbles). The
        halves, not neighbouring rows, share a byte so that a kernel loads a [bk, bn] tile of
        bytes and gets two ordinary [bk, bn] tiles of K (rows k0.. and K/2 + k0..) with no
        interleaving in registers. G must divide K; K must be even.

Scales are symmetric (no zero point): scale = max |w| over the group / (2^(bits-1) - 1), so the
largest weight of each group is exact and zero stays zero. Kernels dequantize tiles in
registers and accumulate in float32; `dequantize` here is the oracle they are tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.config import ConfigError

BITS = (4, 8)


def max_code(bits: int) -> int:
    """The largest code magnitude: 127 for int8, 7 for int4."""
    return (1 << (bits - 1)) - 1


def check_format(bits: int, group_size: int, k: int) -> None:
    """One-line errors for a format that cannot store a [.., K, N] weight."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits} is not supported: choose one of {BITS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"group_size={group_size} must be a positive integer")
    if k % group_size:
        raise ConfigError(f"group_size={group_size} does not divide the contraction width {k}")
    if bits == 4 and k % 2:
        raise ConfigError(f"int4 packs two rows per byte: the contraction width {k} must be even")


@struct.dataclass
class QuantizedWeight:
    """A quantized [..., K, N] weight: codes and scales (pytree leaves), bits and G (static).

    Attributes:
      codes: [..., K, N] int8 (bits 8) or [..., K/2, N] uint8 (bits 4, see the module doc).
      scale: [..., K/G, N] float (float32 or bfloat16).
    """

    codes: jax.Array
    scale: jax.Array
    bits: int = struct.field(pytree_node=False, default=8)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight it stands for, [..., K, N]."""
        *lead, rows, n = self.codes.shape
        return (*lead, rows * 2 if self.bits == 4 else rows, n)

    @property
    def group_size(self) -> int:
        return self.shape[-2] // self.scale.shape[-2]

    def __getitem__(self, index) -> QuantizedWeight:
        """Indexes the leading (stack) axes, e.g. one layer of an [L, E, K, N] stack."""
        return QuantizedWeight(self.codes[index], self.scale[index], self.bits)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def pack_int4(codes: jax.Array) -> jax.Array:
    """[..., K, N] int8 codes in [-8, 7] -> [..., K/2, N] uint8 (low nibble: rows < K/2)."""
    half = codes.shape[-2] // 2
    low = codes[..., :half, :].astype(jnp.uint8) & 0xF
    high = codes[..., half:, :].astype(jnp.uint8) & 0xF
    return low | (high << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """[..., K/2, N] uint8 -> [..., K, N] int8: the exact inverse of `pack_int4`."""
    low = (packed & 0xF).astype(jnp.int8)
    high = (packed >> 4).astype(jnp.int8)
    low = jnp.where(low > 7, low - 16, low)  # two's complement nibbles
    high = jnp.where(high > 7, high - 16, high)
    return jnp.concatenate([low, high], axis=-2)


def quantize(
    w: jax.Array, bits: int, group_size: int | None = None, scale_dtype=jnp.float32
) -> QuantizedWeight:
    """Symmetric round-to-nearest quantization of w [..., K, N] in groups of G rows of K.

    group_size None: the whole of K (one scale per output channel). The scale is computed in
    float32 and rounded to `scale_dtype` before the codes are, so codes fit the stored scale.
    """
    k, n = w.shape[-2:]
    group_size = k if group_size is None else group_size
    check_format(bits, group_size, k)
    lead = w.shape[:-2]
    groups = w.astype(jnp.float32).reshape(*lead, k // group_size, group_size, n)
    peak = jnp.max(jnp.abs(groups), axis=-2)  # [..., K/G, N]
    scale = (peak / max_code(bits)).astype(scale_dtype)
    safe = jnp.where(scale == 0, 1.0, scale.astype(jnp.float32))[..., None, :]
    codes = jnp.clip(jnp.round(groups / safe), -max_code(bits), max_code(bits))
    codes = codes.reshape(*lead, k, n).astype(jnp.int8)
    if bits == 4:
        codes = pack_int4(codes)
    return QuantizedWeight(codes, scale, bits)


def codes_of(w: QuantizedWeight) -> jax.Array:
    """The integer codes as int8 [..., K, N] (int4 unpacked)."""
    return unpack_int4(w.codes) if w.bits == 4 else w.codes


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """codes * scale as [..., K, N] in `dtype` (the product in float32, then rounded)."""
    codes = codes_of(w).astype(jnp.float32)
    *lead, k, n = codes.shape
    groups = codes.reshape(*lead, w.scale.shape[-2], -1, n)
    return (groups * w.scale.astype(jnp.float32)[..., None, :]).reshape(*lead, k, n).astype(dtype)


def stored_bytes(w: QuantizedWeight) -> int:
    """Bytes of codes and scales."""
    return w.codes.size * w.codes.dtype.itemsize + w.scale.size * w.scale.dtype.itemsize
