"""How a kernel reads one tile of a weight: a float weight as stored, a quantized one dequantized.

Every matmul kernel here walks the contraction of a weight [..., K, N] in steps of `block_k`
*stored rows* and adds x[:, rows] @ w[rows, cols] per step, in float32. What a step reads
depends on the format (`quant.py`):

  float  K stored rows; a step at stored rows [r0, r0 + bk) is the tile w[r0 : r0 + bk].
  int8   K stored rows of int8 codes; the tile is codes[r0 : r0 + bk] * its group's scale row.
  int4   K/2 stored byte rows; byte row i holds row i (low nibble) and row K/2 + i (high
         nibble), so a step yields TWO tiles of K: rows r0.. and K/2 + r0.., each times its
         own group's scale row.

Quantized tiles are dequantized in registers exactly as the oracle `quant.dequantize` does
(codes and scale in float32, the product rounded to the compute dtype), so a kernel fed the
same tiles computes the float kernel's function on the dequantized weight. A step's tile must
lie in one scale group: `block_k` divides G (and K/2 for int4), which `max_block_k` gives and
`common.fit` honours. Only the weight's bytes cross memory: 1 byte (int8) or 1/2 (int4) per
weight plus the scales, against 2 for bfloat16.

Letters: K contraction width, N output width, G scale group (rows of K per scale).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mixtral_jax.kernels import common, quant
from mixtral_jax.kernels.quant import QuantizedWeight


def stored_rows(w) -> int:
    """Rows of the contraction a kernel walks: K, or K/2 byte rows for int4."""
    return w.codes.shape[-2] if isinstance(w, QuantizedWeight) else w.shape[-2]


def max_block_k(w) -> int:
    """The largest step (stored rows) that keeps every tile in one scale group: gcd(rows, G)."""
    if not isinstance(w, QuantizedWeight):
        return stored_rows(w)
    return math.gcd(stored_rows(w), w.group_size)


def weight_itemsize(w) -> int:
    """Bytes per stored element of the weight stream (codes: 1; float: its dtype's)."""
    return w.codes.dtype.itemsize if isinstance(w, QuantizedWeight) else w.dtype.itemsize


def tiles_per_step(w) -> int:
    """Tiles of K (and x tiles) one step yields: 2 for int4, else 1."""
    return 2 if isinstance(w, QuantizedWeight) and w.bits == 4 else 1


def format_of(w) -> tuple[int, int] | None:
    """(bits, group size) of a quantized weight, None for a float one."""
    return (w.bits, w.group_size) if isinstance(w, QuantizedWeight) else None


def fit(
    tiles: common.DecodeTiles, rows: int, w, width: int, streams: int, itemsize: int
) -> common.DecodeTiles:
    """`common.fit` for a weight of any format: steps over its stored rows, inside one scale
    group, with its element size; `itemsize` is x's (the compute dtype's)."""
    return common.fit(
        tiles,
        rows,
        stored_rows(w),
        width,
        streams,
        itemsize,
        group=max_block_k(w),
        weight_itemsize=weight_itemsize(w),
        x_tiles=tiles_per_step(w),
    )


def load(w, lead: tuple, r0, col0, bk: int, bn: int, dtype) -> list[tuple[jax.Array, jax.Array]]:
    """Inside a kernel: the tiles of stored rows [r0, r0 + bk), columns [col0, col0 + bn).

    Args:
      w: a weight Ref [..., K, N], or a QuantizedWeight of Refs (codes, scale).
      lead: indices of the leading (stack) axes, e.g. (layer, expert).
      r0, col0: first stored row (a multiple of bk) and first column.
      dtype: the compute dtype the tiles come in.
    Returns:
      [(row0, tile [bk, bn] in dtype)]: row0 the first row of K the tile covers (the x columns
      it multiplies); one pair, or two for int4.
    """
    rows, cols = pl.ds(r0, bk), pl.ds(col0, bn)
    if not isinstance(w, QuantizedWeight):
        return [(r0, w[(*lead, rows, cols)])]
    codes = w.codes[(*lead, rows, cols)]  # [bk, bn] int8, or uint8 pairs of int4
    if w.bits == 8:
        parts = [(r0, codes)]
    else:
        signed = codes.astype(jnp.int8)  # the same bits: two's complement nibbles
        four = jnp.int8(4)
        low = jax.lax.shift_right_arithmetic(jax.lax.shift_left(signed, four), four)
        parts = [(r0, low), (r0 + w.shape[-2] // 2, jax.lax.shift_right_arithmetic(signed, four))]
    tiles = []
    for row0, c in parts:
        scale = w.scale[(*lead, row0 // w.group_size, cols)].astype(jnp.float32)  # [bn]
        tiles.append((row0, (c.astype(jnp.float32) * scale[None, :]).astype(dtype)))
    return tiles


def check_codes(w: QuantizedWeight) -> None:
    """ValueError for a QuantizedWeight whose codes or bits the kernels cannot read."""
    want = jnp.int8 if w.bits == 8 else jnp.uint8
    if w.bits not in quant.BITS or w.codes.dtype != want:
        raise ValueError(
            f"quantized weight of bits={w.bits} needs {jnp.dtype(want).name} codes, got "
            f"{w.codes.dtype.name}"
        )


def supports_format(bits: int, group_size: int, k: int) -> bool:
    """Whether the kernels read this format of a [.., K, N] weight: a step of >= 16 stored rows
    (the matrix units' smallest tile) must lie in one scale group (the kernel plan's check)."""
    rows = k // 2 if bits == 4 else k
    return math.gcd(rows, group_size) % 16 == 0
