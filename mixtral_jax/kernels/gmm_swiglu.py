"""The experts' gate and up projections as one grouped matmul with SwiGLU in its epilogue.

  h[A, F] = silu(x @ w_gate[g]) * (x @ w_up[g])     per row group g

One Pallas-Triton kernel reads both weights (two rhs, no concatenated [E, D, 2F] copy: the
checkpoint layout stays w_gate / w_up) and keeps two float32 accumulators; each x tile it loads
serves both products, and the epilogue applies silu(gate) * up in float32 before one store.
The unfused path (`gmm_pallas.gmm` twice, then XLA's SwiGLU) writes gate and up to HBM and
reads them back.

Backward (custom VJP): the forward under differentiation also stores the gate and up
pre-activations [A, F] (the same residuals the unfused path's autodiff keeps), and the backward
takes SwiGLU's VJP of them, then the existing kernels: d x = gmm_t(d gate, w_gate) +
gmm_t(d up, w_up), d w_* = tgmm(x, d *). It does not recompute gate and up from x: at Mixtral
8x7B widths and 32k rows that is 2 x 2 x A x D x F = 7.7 TFLOP (~12 ms per layer on an H200)
against ~1 ms of memory traffic to store and reload them.

`expert_ffn` is the whole expert FFN, (silu(x W_gate) * (x W_up)) W_down, with its own VJP: the
forward is gmm_swiglu then gmm; the backward computes d h = dy W_down^T and the SwiGLU's backward
in one kernel (`_bwd_kernel`: the d h tile stays in registers, the stored gate and up are read in
its epilogue, d gate and d up are written), so neither d h nor a separate elementwise pass over
[A, F] reaches memory. The dropless MoE runs it where the plan's `fused_swiglu` holds.

Schedule, masking, padding and the virtual group of rows past the last group are those of
`gmm_pallas.gmm` (rows past sum(group_sizes) come out as zeros). `interpret=True` runs the
kernel in Pallas' interpreter (the CPU tests; oracle: the unfused path,
tests/kernels/test_gmm_swiglu.py). Letters: A rows, G groups, D contraction, F output width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels import gmm_pallas
from mixtral_jax.kernels.common import SMEM_BYTES
from mixtral_jax.kernels.gmm_pallas import Tiles

# Two [bm, bn] float32 accumulators: half the column tile of the single gmm's 128 x 256 keeps
# the registers per thread of one accumulator. Not yet swept on the H200 (bench/train_parts.py
# times it against the unfused pair).
FUSED = Tiles(128, 128, 64, num_warps=8, num_stages=4)
# The backward's d h kernel keeps one accumulator but holds it beside the gate and up tiles in
# its epilogue: the same half-width column tile. Not yet swept either.
FUSED_BWD = Tiles(128, 128, 64, num_warps=8, num_stages=4)


def tiles_for(rows: int, itemsize: int = 2) -> Tiles:
    """The fused kernel's tiles: an x tile and two weight tiles per pipeline stage, shrunk until
    they fit in shared memory; decode-sized calls take gmm's decode tiles."""
    tiles = gmm_pallas.DECODE if rows <= gmm_pallas.DECODE_ROWS else FUSED

    def need(t):
        return t.num_stages * (t.block_m * t.block_k + 2 * t.block_k * t.block_n) * itemsize

    return gmm_pallas.shrink_until_fits(tiles, need, SMEM_BYTES)


def bwd_tiles_for(rows: int, itemsize: int = 2) -> Tiles:
    """The backward d h kernel's tiles: a dy tile and a w_down tile per stage, fitted."""
    tiles = gmm_pallas.DECODE if rows <= gmm_pallas.DECODE_ROWS else FUSED_BWD

    def need(t):
        return t.num_stages * (t.block_m * t.block_k + t.block_k * t.block_n) * itemsize

    return gmm_pallas.shrink_until_fits(tiles, need, SMEM_BYTES)


def _kernel(
    work_group_ref,
    work_tile_ref,
    starts_ref,
    ends_ref,
    lhs_ref,
    gate_ref,
    up_ref,
    *out_refs,
    tiles: Tiles,
    num_items: int,
    num_cols: int,
    steps: int,
    num_groups: int,
    precision,
):
    """One (row tile, group, column tile): h (and, if three outputs, gate and up) of its rows."""
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    group, row0, col0, mask = gmm_pallas.row_tile(
        tiles, num_items, num_cols, work_group_ref, work_tile_ref, starts_ref, ends_ref
    )
    blocks = [ref.at[pl.ds(row0, bm), pl.ds(col0, bn)] for ref in out_refs]

    @pl.when(group == num_groups)  # rows past the last group
    def _():
        for block, ref in zip(blocks, out_refs):
            plgpu.store(block, jnp.zeros((bm, bn), ref.dtype), mask=mask)

    @pl.when((group >= 0) & (group < num_groups))
    def _():
        g = jnp.maximum(group, 0)
        dims = (((1,), (0,)), ((), ()))

        def step(i, accs):
            k0 = pl.multiple_of(i * bk, bk)
            a = lhs_ref[pl.ds(row0, bm), pl.ds(k0, bk)]  # [bm, bk]
            return tuple(
                acc
                + jax.lax.dot_general(
                    a,
                    w_ref[g, pl.ds(k0, bk), pl.ds(col0, bn)],  # [bk, bn]
                    dims,
                    precision=precision,
                    preferred_element_type=jnp.float32,
                )
                for acc, w_ref in zip(accs, (gate_ref, up_ref))
            )

        zero = jnp.zeros((bm, bn), jnp.float32)
        gate, up = jax.lax.fori_loop(0, steps, step, (zero, zero))
        h = gate / (1.0 + jnp.exp(-gate)) * up  # silu(gate) * up in float32 (Triton-safe)
        for block, ref, value in zip(blocks, out_refs, (h, gate, up)):
            plgpu.store(block, value.astype(ref.dtype), mask=mask)


def _call(lhs, w_gate, w_up, group_sizes, *, save: bool, interpret: bool):
    """lhs [A, D], w_gate, w_up [G, D, F] -> h [A, F] (save: (h, gate, up)), padded to tiles."""
    rows, contract = lhs.shape
    num_groups, _, width = w_gate.shape
    tiles = gmm_pallas.fit_tiles(tiles_for(rows, lhs.dtype.itemsize), rows, contract, width)
    pad = gmm_pallas._pad_to
    lhs_p = pad(pad(lhs, 0, tiles.block_m), 1, tiles.block_k)
    w_gate_p, w_up_p = (pad(pad(w, 1, tiles.block_k), 2, tiles.block_n) for w in (w_gate, w_up))
    rows_p, contract_p = lhs_p.shape
    out = jax.ShapeDtypeStruct((rows_p, w_gate_p.shape[2]), lhs.dtype)
    outs = gmm_pallas.row_tile_call(
        _kernel,
        (lhs_p, w_gate_p, w_up_p),
        (out,) * (3 if save else 1),
        group_sizes=group_sizes,
        tiles=tiles,
        steps=contract_p // tiles.block_k,
        num_groups=num_groups,
        dtype=lhs.dtype,
        name="gmm_swiglu",
        interpret=interpret,
    )
    return tuple(o[:rows, :width] for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gmm_swiglu(lhs, w_gate, w_up, group_sizes, interpret: bool = False):
    """silu(lhs @ w_gate[g]) * (lhs @ w_up[g]) over row groups: [A, D] -> [A, F] in lhs's dtype.

    Args:
      lhs: [A, D] rows sorted by group.
      w_gate, w_up: [G, D, F] in lhs's dtype.
      group_sizes: [G] int32, summing to at most A; rows past the sum come out as zeros.
      interpret: run in Pallas' interpreter (CPU tests).
    """
    return _call(lhs, w_gate, w_up, group_sizes, save=False, interpret=interpret)[0]


def _fwd(lhs, w_gate, w_up, group_sizes, interpret):
    h, gate, up = _call(lhs, w_gate, w_up, group_sizes, save=True, interpret=interpret)
    return h, (lhs, w_gate, w_up, group_sizes, gate, up)


def _bwd(interpret, residuals, dh):
    lhs, w_gate, w_up, group_sizes, gate, up = residuals
    _, swiglu_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, gate, up)
    d_gate, d_up = swiglu_vjp(dh.astype(lhs.dtype))  # [A, F] each
    gmm_t = functools.partial(
        gmm_pallas._gmm, group_sizes=group_sizes, transpose_rhs=True, interpret=interpret
    )
    d_lhs = gmm_t(d_gate, w_gate) + gmm_t(d_up, w_up)
    num_groups = w_gate.shape[0]
    d_w = [
        gmm_pallas._tgmm(lhs, d, group_sizes, num_groups, interpret=interpret)
        for d in (d_gate, d_up)
    ]
    return d_lhs, d_w[0].astype(w_gate.dtype), d_w[1].astype(w_up.dtype), None


gmm_swiglu.defvjp(_fwd, _bwd)


# ---- the whole expert FFN: the SwiGLU's backward in the epilogue of the down projection's d h
def _bwd_kernel(
    work_group_ref,
    work_tile_ref,
    starts_ref,
    ends_ref,
    dy_ref,
    w_ref,
    gate_ref,
    up_ref,
    d_gate_ref,
    d_up_ref,
    *,
    tiles: Tiles,
    num_items: int,
    num_cols: int,
    steps: int,
    num_groups: int,
    precision,
):
    """One (row tile, group, column tile of F): d h = dy @ w_down[g]^T in float32, then
    d gate = d h * up * silu'(gate) and d up = d h * silu(gate) from the stored gate and up."""
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    group, row0, col0, mask = gmm_pallas.row_tile(
        tiles, num_items, num_cols, work_group_ref, work_tile_ref, starts_ref, ends_ref
    )
    at = (pl.ds(row0, bm), pl.ds(col0, bn))

    @pl.when(group == num_groups)  # rows past the last group
    def _():
        for ref in (d_gate_ref, d_up_ref):
            plgpu.store(ref.at[at], jnp.zeros((bm, bn), ref.dtype), mask=mask)

    @pl.when((group >= 0) & (group < num_groups))
    def _():
        g = jnp.maximum(group, 0)

        def step(i, acc):
            k0 = pl.multiple_of(i * bk, bk)
            a = dy_ref[pl.ds(row0, bm), pl.ds(k0, bk)]  # [bm, bk]
            b = w_ref[g, pl.ds(col0, bn), pl.ds(k0, bk)]  # [bn, bk] of w_down [G, F, D]
            return acc + jax.lax.dot_general(
                a,
                b,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )

        dh = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        gate, up = (
            plgpu.load(ref.at[at], mask=mask, other=0).astype(jnp.float32)
            for ref in (gate_ref, up_ref)
        )
        sig = 1.0 / (1.0 + jnp.exp(-gate))
        d_up = dh * gate * sig
        d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
        for ref, value in ((d_gate_ref, d_gate), (d_up_ref, d_up)):
            plgpu.store(ref.at[at], value.astype(ref.dtype), mask=mask)


def _bwd_call(dy, w_down, gate, up, group_sizes, *, interpret: bool):
    """dy [A, D], w_down [G, F, D], gate, up [A, F] -> (d gate, d up) [A, F], padded to tiles."""
    rows, contract = dy.shape
    num_groups, width, _ = w_down.shape
    tiles = gmm_pallas.fit_tiles(bwd_tiles_for(rows, dy.dtype.itemsize), rows, contract, width)
    pad = gmm_pallas._pad_to
    dy_p = pad(pad(dy, 0, tiles.block_m), 1, tiles.block_k)
    w_p = pad(pad(w_down, 1, tiles.block_n), 2, tiles.block_k)
    gate_p, up_p = (pad(pad(x, 0, tiles.block_m), 1, tiles.block_n) for x in (gate, up))
    rows_p, contract_p = dy_p.shape
    out = jax.ShapeDtypeStruct((rows_p, w_p.shape[1]), dy.dtype)
    d_gate, d_up = gmm_pallas.row_tile_call(
        _bwd_kernel,
        (dy_p, w_p, gate_p, up_p),
        (out, out),
        group_sizes=group_sizes,
        tiles=tiles,
        steps=contract_p // tiles.block_k,
        num_groups=num_groups,
        dtype=dy.dtype,
        name="gmm_t_swiglu_bwd",
        interpret=interpret,
    )
    return d_gate[:rows, :width], d_up[:rows, :width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def expert_ffn(lhs, w_gate, w_up, w_down, group_sizes, interpret: bool = False):
    """The experts' SwiGLU FFN over row groups: (silu(lhs W_gate[g]) * (lhs W_up[g])) W_down[g].

    Args:
      lhs: [A, D] rows sorted by group; w_gate, w_up: [G, D, F]; w_down: [G, F, D], all in
        lhs's dtype; group_sizes: [G] int32 (rows past their sum come out as zeros).
    Returns:
      [A, D] in lhs's dtype. Forward: `gmm_swiglu`, then `gmm_pallas.gmm`. Backward: d h and
      the SwiGLU's backward in one kernel (`_bwd_kernel`: d h never reaches memory), then
      gmm_t / tgmm for d lhs and the three weight gradients. Residuals: gate, up, h [A, F].
    """
    h = gmm_swiglu(lhs, w_gate, w_up, group_sizes, interpret)
    return gmm_pallas._gmm(h, w_down, group_sizes, transpose_rhs=False, interpret=interpret)


def _ffn_fwd(lhs, w_gate, w_up, w_down, group_sizes, interpret):
    h, gate, up = _call(lhs, w_gate, w_up, group_sizes, save=True, interpret=interpret)
    y = gmm_pallas._gmm(h, w_down, group_sizes, transpose_rhs=False, interpret=interpret)
    return y, (lhs, w_gate, w_up, w_down, group_sizes, gate, up, h)


def _ffn_bwd(interpret, residuals, dy):
    lhs, w_gate, w_up, w_down, group_sizes, gate, up, h = residuals
    dy = dy.astype(lhs.dtype)
    d_gate, d_up = _bwd_call(dy, w_down, gate, up, group_sizes, interpret=interpret)
    num_groups = w_gate.shape[0]
    tgmm = functools.partial(
        gmm_pallas._tgmm, group_sizes=group_sizes, num_groups=num_groups, interpret=interpret
    )
    gmm_t = functools.partial(
        gmm_pallas._gmm, group_sizes=group_sizes, transpose_rhs=True, interpret=interpret
    )
    d_lhs = gmm_t(d_gate, w_gate) + gmm_t(d_up, w_up)
    d_ws = (tgmm(lhs, d_gate), tgmm(lhs, d_up), tgmm(h, dy))
    return d_lhs, *(d.astype(w.dtype) for d, w in zip(d_ws, (w_gate, w_up, w_down))), None


expert_ffn.defvjp(_ffn_fwd, _ffn_bwd)
