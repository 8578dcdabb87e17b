"""Projections of decode-sized calls reading layer l of a weight stack in place: one Pallas kernel.

Inside `Mixtral.extend`'s layer scan, each layer's attention weights are a slice of a stack
[L, K, N]. Sliced as scan inputs they are copied before XLA's matmul reads them (H200, 8x7B,
batch-1 decode: 1.0 ms of 9.2 per token, then read a third time by the matmul). This kernel reads
the layer where it lies and splits the contraction so that even a short, narrow projection
(k_proj: 4096 x 1024) has enough programs in flight to stream at memory bandwidth.

`project_stacked(x, stacks, layer)` computes x @ stack[layer] for several stacks that share the
contraction width (q, k and v from the same x) in ONE launch: the programs of all stacks form
one grid; each program knows its stack from its id. More than MAX_TOKENS rows (a serving step
of hundreds of rows) run in row tiles of MAX_TOKENS, the tiles of one weight tile side by side.
Partial sums per split come back in float32 and are added by XLA (which fuses the sum into the
consumer).

A stack may be a `quant.QuantizedWeight` [L, K, N] (int8 or int4 attention projections): its
code tiles become integer codes in x's dtype in registers and the float32 partial products are
scaled per group (`weight_tiles.load`); each stack is read in its own format, and the splits
walk its stored rows (K/2 byte rows for int4). One token can instead run on the vector units
(`vector=True`, `weight_tiles.vector_step`).

Letters: M tokens, K contraction width, N output width, J splits of K, L layers.
Inference only: no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels import weight_tiles
from mixtral_jax.kernels.common import (
    MAX_TOKENS,
    DecodeTiles,
    fit,
    matmul_precision,
    pow2_at_least,
)
from mixtral_jax.kernels.quant import QuantizedWeight

# From bench/expert_decode_tiles.py's projection sweep on one H200 (bfloat16, 8x7B widths).
PROJECTION = DecodeTiles(block_n=64, block_k=128, splits=4, num_warps=4, num_stages=4)
# Quantized stacks take the same tiles (block_k in stored rows): H200, 8x7B widths, the best of
# those tried for int8 and int4 at 1 and 64 tokens (int8, 1 token: 28.2 us against 31.3 for
# block_k 256 / 8 warps), measured on the scale-before-dot form of the kernel. The one-token
# vector path, by reasoning until measured: a [bk, bn] float32 accumulator of 32 x 64 over 128
# threads.
VECTOR = DecodeTiles(block_n=64, block_k=32, splits=4, num_warps=4, num_stages=4)
# More than MAX_TOKENS rows: enough programs without splitting K, whose float32 partial sums
# cost a write and a read of [J, M, N] each. bench/projection_rows.py on one H200 (q/k/v + o of
# 8x7B, bf16, whole calls): 256 rows 157 us against 300 with the decode tiles (XLA's matmul of an
# unstacked weight: 175); 512 rows in row tiles of 128 with 64 columns 201 us against 260 in row
# tiles of 64 (557 with the decode tiles; XLA 264); 128 rows 159 either way.
ROW_TILE, ROWS = MAX_TOKENS, DecodeTiles(block_n=128, block_k=64, splits=1, num_stages=4)
WIDE_ROW_TILE, WIDE_ROWS = 128, DecodeTiles(block_n=64, block_k=64, splits=1, num_stages=4)
WIDE = 256  # rows above which the wide row tiles apply
# Above MAX_TOKENS rows a narrow output (the router: N = 16 padded) has one column tile per row
# tile: 4 programs at 256 rows, each walking all of K alone (15.3 us a layer in the H200 step's
# profile, `engine_b256_tiles_profile.json`, against 24.5 for o_proj's 128 programs). Those
# calls split K until the grid has MIN_PROGRAMS programs (at most MAX_NARROW_SPLITS splits; the
# float32 partials [J, M, N] of a narrow output are small).
MIN_PROGRAMS, MAX_NARROW_SPLITS = 64, 16


def _kernel(
    layer_ref,
    x_ref,
    *refs,
    tiles: DecodeTiles,
    cols: tuple[int, ...],
    steps: tuple[int, ...],
    rows: int,
    row_tiles: int,
    precision,
    vector: bool,
    dequant: str,
):
    """Program p * row_tiles + t: stack i whose column tiles hold p, column tile c, split j of
    K, over row tile t of x (the row tiles of one weight tile run side by side, so the tile one
    brought into L2 is still there for the next: the weights cross HBM about once). With
    `vector` (one token) only row 0 is written."""
    num = len(cols)
    w_refs, out_refs = refs[:num], refs[num:]
    bm, bn, bk, splits = x_ref.shape[0] // row_tiles, tiles.block_n, tiles.block_k, tiles.splits
    layer = layer_ref[0]
    pid, row_tile = pl.program_id(0) // row_tiles, pl.program_id(0) % row_tiles
    row0 = pl.multiple_of(row_tile * bm, bm)
    row_mask = jnp.broadcast_to((row0 + jnp.arange(bm) < rows)[:, None], (bm, bn))
    first = 0
    for w_ref, out_ref, num_cols, num_steps in zip(w_refs, out_refs, cols, steps):
        last = first + num_cols * splits

        @pl.when((pid >= first) & (pid < last))
        def _(w_ref=w_ref, out_ref=out_ref, first=first, num_steps=num_steps):
            local = pid - first
            col, split = local // splits, local % splits
            col0 = pl.multiple_of(col * bn, bn)

            if vector:  # one token (row 0), on the vector units

                def x_of(k0):  # [bk] of the token
                    return x_ref[jnp.int32(0), pl.ds(k0, bk)]

                def vector_step(i, acc):
                    r0 = pl.multiple_of((split * num_steps + i) * bk, bk)  # stored rows
                    return weight_tiles.vector_step(acc, x_of, w_ref, (layer,), r0, col0, bk, bn)

                acc = jax.lax.fori_loop(0, num_steps, vector_step, jnp.zeros((bk, bn), jnp.float32))
                out = out_ref.at[split, jnp.int32(0), pl.ds(col0, bn)]
                plgpu.store(out, jnp.sum(acc, axis=0))
                return

            def step(i, acc):
                r0 = pl.multiple_of((split * num_steps + i) * bk, bk)  # stored rows
                for tile in weight_tiles.load(
                    w_ref, (layer,), r0, col0, bk, bn, x_ref.dtype, dequant
                ):
                    a = x_ref[pl.ds(row0, bm), pl.ds(tile.row0, bk)]  # [bm, bk]
                    acc = acc + weight_tiles.product(a, tile, precision)
                return acc

            acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((bm, bn), jnp.float32))
            out = out_ref.at[split, pl.ds(row0, bm), pl.ds(col0, bn)]
            plgpu.store(out, acc, mask=row_mask)

        first = last


def project_stacked(
    x: jax.Array,
    stacks: tuple[jax.Array | QuantizedWeight, ...],
    layer: jax.Array | int,
    *,
    out_dtype=None,
    tiles: DecodeTiles | None = None,
    row_tile: int | None = None,
    vector: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """x @ stack[layer] for each stack, in one launch.

    Args:
      x: [M, K] tokens in the compute dtype: up to MAX_TOKENS in one row tile, more in row
        tiles of `row_tile` (default ROW_TILE, WIDE_ROW_TILE above WIDE rows; their programs
        adjacent: each weight tile is read ~once).
      stacks: each [L, K, N_i] in x's dtype (the same L and K), or a `QuantizedWeight` of
        that shape (any format the kernels read, `weight_tiles.supports_format`).
      layer: int32 scalar.
      out_dtype: of the results; x's dtype if None.
      vector: one token (M = 1) on the vector units (`weight_tiles.vector_step`) instead of
        matrix-unit dots of 16 padded rows: the same function, float32 throughout.
      tiles: default PROJECTION (VECTOR with `vector`), ROWS above MAX_TOKENS rows, WIDE_ROWS
        (row tiles of WIDE_ROW_TILE) above WIDE rows.
    Returns:
      one [M, N_i] per stack (float32 accumulation and split sum).
    """
    m, contract = x.shape
    if any(s.shape[-2] != contract for s in stacks):
        raise ValueError(f"every stack needs K={contract} rows, got {[s.shape for s in stacks]}")
    wide = m > WIDE
    bm = pow2_at_least(m) if m <= MAX_TOKENS else row_tile or (WIDE_ROW_TILE if wide else ROW_TILE)
    row_tiles = -(-m // bm)
    widths = [s.shape[-1] for s in stacks]
    if vector and m != 1:
        raise ValueError(f"project_stacked(vector=True) takes one token, got {m}")
    default = VECTOR if vector else PROJECTION if m <= MAX_TOKENS else WIDE_ROWS if wide else ROWS
    t = _fit(tiles or default, bm, stacks, x.dtype.itemsize)
    if tiles is None and m > MAX_TOKENS:
        t = _split_narrow(t, row_tiles * sum(w // t.block_n for w in widths), bm, stacks, x)
    steps = tuple(weight_tiles.stored_rows(s) // (t.splits * t.block_k) for s in stacks)
    cols = tuple(w // t.block_n for w in widths)
    precision = matmul_precision(x.dtype)
    padded = row_tiles * bm
    parts = pl.pallas_call(
        functools.partial(
            _kernel,
            tiles=t,
            cols=cols,
            steps=steps,
            rows=m,
            row_tiles=row_tiles,
            precision=precision,
            vector=vector,
            dequant=weight_tiles.dequant_for(interpret),
        ),
        out_shape=tuple(jax.ShapeDtypeStruct((t.splits, padded, w), jnp.float32) for w in widths),
        grid=(sum(cols) * t.splits * row_tiles,),
        compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        interpret=interpret,
        name="decode_projection",
    )(jnp.asarray(layer, jnp.int32).reshape(1), jnp.pad(x, ((0, padded - m), (0, 0))), *stacks)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return tuple(jax.lax.stop_gradient(jnp.sum(p[:, :m], axis=0).astype(out_dtype)) for p in parts)


def _split_narrow(t: DecodeTiles, programs: int, bm: int, stacks, x) -> DecodeTiles:
    """t with K split (a power of two <= MAX_NARROW_SPLITS, each split whole block_k steps)
    until the grid's `programs` x splits reaches MIN_PROGRAMS; t itself if it does already."""
    splits = t.splits
    while programs * splits < MIN_PROGRAMS and splits < MAX_NARROW_SPLITS:
        splits *= 2
    if splits == t.splits:
        return t
    fitted = _fit(dataclasses.replace(t, splits=splits), bm, stacks, x.dtype.itemsize)
    rows = math.gcd(*(weight_tiles.stored_rows(s) for s in stacks))
    return fitted if rows % (fitted.splits * fitted.block_k) == 0 else t


def _fit(base: DecodeTiles, bm: int, stacks, itemsize: int) -> DecodeTiles:
    """One tiling for all stacks: block_n divides every width, block_k * splits every stack's
    stored rows and block_k lies in one scale group of each (`common.fit`)."""
    for s in stacks:
        if isinstance(s, QuantizedWeight):
            weight_tiles.check_codes(s)
    return fit(
        base,
        bm,
        math.gcd(*(weight_tiles.stored_rows(s) for s in stacks)),
        math.gcd(*(s.shape[-1] for s in stacks)),
        1,
        itemsize,
        group=math.gcd(*(weight_tiles.max_block_k(s) for s in stacks)),
        weight_itemsize=max(weight_tiles.weight_itemsize(s) for s in stacks),
        x_tiles=max(weight_tiles.tiles_per_step(s) for s in stacks),
    )
