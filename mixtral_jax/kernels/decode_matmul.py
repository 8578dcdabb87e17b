"""Projections of a few tokens (decode) reading layer l of a weight stack in place: one Pallas kernel.

Inside `Mixtral.extend`'s layer scan, each layer's attention weights are a slice of a stack
[L, K, N]. Sliced as scan inputs they are copied before XLA's matmul reads them (H200, 8x7B,
batch-1 decode: 1.0 ms of 9.2 per token, then read a third time by the matmul). This kernel reads
the layer where it lies and splits the contraction so that even a short, narrow projection
(k_proj: 4096 x 1024) has enough programs in flight to stream at memory bandwidth.

`project_stacked(x, stacks, layer)` computes x @ stack[layer] for several stacks that share the
contraction width (q, k and v from the same x) in ONE launch: the programs of all stacks form
one grid; each program knows its stack from its id. Partial sums per split come back in float32
and are added by XLA (which fuses the sum into the consumer).

Letters: M tokens, K contraction width, N output width, J splits of K, L layers.
Inference only: no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels.common import (
    MAX_TOKENS,
    DecodeTiles,
    dot_f32,
    fit,
    matmul_precision,
    pow2_at_least,
)

# From bench/expert_decode_tiles.py's projection sweep on one H200 (bfloat16, 8x7B widths).
PROJECTION = DecodeTiles(block_n=64, block_k=128, splits=4, num_warps=4, num_stages=4)


def _kernel(
    layer_ref,
    x_ref,
    *refs,
    tiles: DecodeTiles,
    cols: tuple[int, ...],
    steps: int,
    rows: int,
    precision,
):
    """Program p: stack i whose column tiles hold p, column tile c, split j of K."""
    num = len(cols)
    w_refs, out_refs = refs[:num], refs[num:]
    bm, bn, bk, splits = x_ref.shape[0], tiles.block_n, tiles.block_k, tiles.splits
    layer = layer_ref[0]
    pid = pl.program_id(0)
    row_mask = jnp.broadcast_to((jnp.arange(bm) < rows)[:, None], (bm, bn))
    first = 0
    for w_ref, out_ref, num_cols in zip(w_refs, out_refs, cols):
        last = first + num_cols * splits

        @pl.when((pid >= first) & (pid < last))
        def _(w_ref=w_ref, out_ref=out_ref, first=first):
            local = pid - first
            col, split = local // splits, local % splits
            col0 = pl.multiple_of(col * bn, bn)

            def step(i, acc):
                k0 = pl.multiple_of((split * steps + i) * bk, bk)
                a = x_ref[:, pl.ds(k0, bk)]  # [bm, bk]
                b = w_ref[layer, pl.ds(k0, bk), pl.ds(col0, bn)]  # [bk, bn]
                return acc + dot_f32(a, b, precision)

            acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
            plgpu.store(out_ref.at[split, :, pl.ds(col0, bn)], acc, mask=row_mask)

        first = last


def project_stacked(
    x: jax.Array,
    stacks: tuple[jax.Array, ...],
    layer: jax.Array | int,
    *,
    out_dtype=None,
    tiles: DecodeTiles | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """x @ stack[layer] for each stack, in one launch.

    Args:
      x: [M, K] tokens (M <= MAX_TOKENS) in the compute dtype.
      stacks: each [L, K, N_i] in x's dtype (the same L and K).
      layer: int32 scalar.
      out_dtype: of the results; x's dtype if None.
    Returns:
      one [M, N_i] per stack (float32 accumulation and split sum).
    """
    m, contract = x.shape
    if m > MAX_TOKENS:
        raise ValueError(f"project_stacked takes at most {MAX_TOKENS} tokens, got {m}")
    bm = pow2_at_least(m)
    widths = [s.shape[-1] for s in stacks]
    base = tiles or PROJECTION
    t = fit(base, bm, contract, min(widths), 1, x.dtype.itemsize)
    for w in widths:  # one column tile for all stacks: the largest that divides every width
        while w % t.block_n:
            t = fit(
                DecodeTiles(t.block_n // 2, t.block_k, t.splits, t.num_warps, t.num_stages),
                bm,
                contract,
                min(widths),
                1,
                x.dtype.itemsize,
            )
    steps = contract // (t.splits * t.block_k)
    cols = tuple(w // t.block_n for w in widths)
    precision = matmul_precision(x.dtype)
    parts = pl.pallas_call(
        functools.partial(_kernel, tiles=t, cols=cols, steps=steps, rows=m, precision=precision),
        out_shape=tuple(jax.ShapeDtypeStruct((t.splits, bm, w), jnp.float32) for w in widths),
        grid=(sum(cols) * t.splits,),
        compiler_params=plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages),
        interpret=interpret,
        name="decode_projection",
    )(jnp.asarray(layer, jnp.int32).reshape(1), jnp.pad(x, ((0, bm - m), (0, 0))), *stacks)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    return tuple(jax.lax.stop_gradient(jnp.sum(p[:, :m], axis=0).astype(out_dtype)) for p in parts)
