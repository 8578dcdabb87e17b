"""How a kernel reads one tile of a weight: a float weight as stored, a quantized one dequantized.

Every matmul kernel here walks the contraction of a weight [..., K, N] in steps of `block_k`
*stored rows* and adds x[:, rows] @ w[rows, cols] per step, in float32. What a step reads
depends on the format (`quant.py`):

  float  K stored rows; a step at stored rows [r0, r0 + bk) is the tile w[r0 : r0 + bk].
  int8   K stored rows of int8 codes; the tile is codes[r0 : r0 + bk] * its group's scale row.
  int4   K/2 stored byte rows; byte row i holds row i (low nibble) and row K/2 + i (high
         nibble), so a step yields TWO tiles of K: rows r0.. and K/2 + r0.., each times its
         own group's scale row.

A quantized tile comes as its integer codes in the compute dtype (exact: |code| <= 127) and
the partial product x @ codes is multiplied by the group's float32 scale row: the kernels then
compute the products of x with the float32 dequantized weight (`quant.dequantize`, the oracle),
summed in float32, at one conversion per weight and one multiply per output per step. A step's
tile must lie in one scale group: `block_k` divides G (and K/2 for int4), which `max_block_k`
gives and `common.fit` honours. Only the weight's bytes cross memory: 1 byte (int8) or 1/2
(int4) per weight plus the scales, against 2 for bfloat16. `vector_step` is the one-token form
(vector units, no matrix-unit dot).

Quantized codes become floats without an int-to-float conversion instruction (`_int8_to_f32`,
`_nibble_to_f32`: integer ops and one float subtraction), then the compute dtype; or, on the
GPU, bfloat16 tiles by inline PTX with no conversion at all (`dequant_ptx.py`). `DEQUANT`
picks one; its default takes the faster per format as measured (`AUTO`: PTX for int4). A
"biased" form that skipped the float step (nibbles ORed into the mantissa of bfloat16 128, the
offset removed after the dot) was measured slower on the H200 in every kernel and removed
(BENCHMARKS.md, third session of 2026-12-02).

Letters: K contraction width, N output width, G scale group (rows of K per scale).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mixtral_jax.kernels import common, dequant_ptx, quant
from mixtral_jax.kernels.quant import QuantizedWeight

# How quantized codes become bfloat16 tiles on the GPU: "float32" (`_int8_to_f32` /
# `_nibble_to_f32`, then a rounding to bfloat16), "ptx" (`dequant_ptx`: inline PTX with no
# conversion instruction), or "auto": per format, the faster of the two as measured on the H200
# (`AUTO`). Interpret mode always takes "float32" (`dequant_for`): it cannot run inline assembly.
DEQUANT = "auto"
DEQUANT_CHOICES = ("auto", "float32", "ptx")
# bits -> tile maker. Full 8x7B decode through `Generator` (bench/quant_decode.py --dequant
# float32,ptx, BENCHMARKS.md, third session of 2026-12-03): int4 with "ptx" 147.2 against 137.1
# tokens/s at batch 1 and 1,914 against 1,723 at batch 64 (8x22B 61.5 against 56.8); int8 with
# "ptx" 125.2 against 142.7 at batch 1 and 2,275 against 2,309 at batch 64. Both give the same
# bits (bench/dequant_check.py).
AUTO = {8: "float32", 4: "ptx"}


def dequant_for(interpret: bool) -> str:
    """The tile maker a kernel call passes to `load`: DEQUANT, or "float32" when interpreted."""
    if DEQUANT not in DEQUANT_CHOICES:
        raise ValueError(f"weight_tiles.DEQUANT={DEQUANT!r}: must be one of {DEQUANT_CHOICES}")
    return "float32" if interpret else DEQUANT


class Tile(NamedTuple):
    """One tile of a weight step, as `load` gives it.

    Attributes:
      row0: the first row of K it covers (the x columns it multiplies).
      values: [bk, bn] in the compute dtype: the weight, or the integer codes (exact).
      scale: [bn] float32, the group's scale row, or None for a float weight.
    """

    row0: Any
    values: jax.Array
    scale: jax.Array | None = None


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


def load(
    w, lead: tuple, r0, col0: int, bk: int, bn: int, dtype, dequant: str = "float32"
) -> list[Tile]:
    """Inside a kernel: the tiles of stored rows [r0, r0 + bk), columns [col0, col0 + bn).

    Args:
      w: a weight Ref [..., K, N], or a QuantizedWeight of Refs (codes, scale).
      lead: indices of the leading (stack) axes, e.g. (layer, expert).
      r0, col0: first stored row (a multiple of bk) and first column.
      dtype: the compute dtype the tiles come in.
      dequant: "auto", "float32" or "ptx" (`dequant_for`; "auto" is `AUTO[bits]`; "ptx"
        applies to bfloat16 tiles).
    Returns:
      one Tile, or two for int4 (rows r0.. and K/2 + r0..). A quantized tile holds the integer
      codes (exact in bfloat16): x @ tile is multiplied by its group's scale row afterwards
      (`product`), in float32, which is cheaper than scaling every weight.
    """
    rows, cols = pl.ds(r0, bk), pl.ds(col0, bn)
    if not isinstance(w, QuantizedWeight):
        return [Tile(r0, w[(*lead, rows, cols)])]
    codes = w.codes[(*lead, rows, cols)]  # [bk, bn] int8, or uint8 pairs of int4
    half = w.shape[-2] // 2
    if dequant == "auto":
        dequant = AUTO[w.bits]
    if dequant == "ptx" and jnp.dtype(dtype) == jnp.bfloat16:  # GPU only: no conversions
        if w.bits == 8:
            parts = [(r0, dequant_ptx.int8_tile(codes))]
        else:
            low, high = dequant_ptx.nibble_tiles(codes)
            parts = [(r0, low), (r0 + half, high)]
    elif w.bits == 8:
        parts = [(r0, _int8_to_f32(codes).astype(dtype))]
    else:
        byte = codes.astype(jnp.int32)  # zero-extended bytes
        parts = [
            (r0, _nibble_to_f32(byte).astype(dtype)),
            (r0 + half, _nibble_to_f32(byte >> 4).astype(dtype)),
        ]
    return [
        Tile(row0, values, w.scale[(*lead, row0 // w.group_size, cols)].astype(jnp.float32))
        for row0, values in parts
    ]


_MATMUL = (((1,), (0,)), ((), ()))  # a [bm, bk] @ b [bk, bn]


def product(a: jax.Array, tile: Tile, precision, dims=_MATMUL) -> jax.Array:
    """a [bm, bk] times a tile's values (as `dims` says), float32 [bm, bn], the scale row
    applied."""
    part = jax.lax.dot_general(
        a, tile.values, dims, precision=precision, preferred_element_type=jnp.float32
    )
    return part if tile.scale is None else part * tile.scale[None, :]


def vector_step(acc, x_of, w, lead: tuple, r0, col0: int, bk: int, bn: int) -> jax.Array:
    """One step of a single token's product on the vector units, in float32.

    acc [bk, bn] += x[rows][:, None] * w[rows, cols] for each tile of the step (summed over
    its rows once, after the loop): for one token a matrix-unit dot wastes 15 of its 16 rows
    and needs the dequantized tile moved into the operand layout first; here each weight costs
    its dequantization and one multiply-add where it was loaded.

    Args:
      x_of: row0 -> the token's [bk] slice of K starting at row0.
    """
    for tile in load(w, lead, r0, col0, bk, bn, jnp.float32):
        weight = tile.values if tile.scale is None else tile.values * tile.scale[None, :]
        acc = acc + x_of(tile.row0).astype(jnp.float32)[:, None] * weight  # [bk, bn]
    return acc


# Codes to float32 without an int-to-float conversion instruction (the GPU issues those at a
# fraction of its add rate, and a tile of codes would be bound by them): an integer u < 2^23
# ORed into the mantissa of 2^23 is the float 2^23 + u, exact, and one subtraction leaves the
# code. Codes are biased to be non-negative first (+128 for int8, XOR 8 for int4 nibbles).
_MAGIC = 0x4B000000  # the bits of the float32 2^23


def _int8_to_f32(codes: jax.Array) -> jax.Array:
    """int8 codes [-127, 127] -> float32, exactly."""
    biased = codes.astype(jnp.int32) + (_MAGIC + 128)
    return jax.lax.bitcast_convert_type(biased, jnp.float32) - float(2**23 + 128)


def _nibble_to_f32(byte: jax.Array) -> jax.Array:
    """The low nibble of int32 bytes (two's complement, [-8, 7]) -> float32, exactly."""
    biased = (byte & 0xF) ^ (_MAGIC + 8)  # nibble + 8, in the mantissa of 2^23
    return jax.lax.bitcast_convert_type(biased, jnp.float32) - float(2**23 + 8)


def check_codes(w: QuantizedWeight) -> None:
    """ValueError for a QuantizedWeight whose codes, bits or groups the kernels cannot read."""
    want = jnp.int8 if w.bits == 8 else jnp.uint8
    if w.bits not in quant.BITS or w.codes.dtype != want:
        raise ValueError(
            f"quantized weight of bits={w.bits} needs {jnp.dtype(want).name} codes, got "
            f"{w.codes.dtype.name}"
        )
    k = w.shape[-2]
    if not supports_format(w.bits, w.group_size, k):
        raise ValueError(
            f"the kernels read K={k}, bits={w.bits} in steps of 16 stored rows inside one scale "
            f"group: group_size={w.group_size} does not allow it"
        )


def supports_format(bits: int, group_size: int, k: int) -> bool:
    """Whether the kernels read this format of a [.., K, N] weight: a step of >= 16 stored rows
    (the matrix units' smallest tile) must lie in one scale group (the kernel plan's check)."""
    rows = k // 2 if bits == 4 else k
    return math.gcd(rows, group_size) % 16 == 0
