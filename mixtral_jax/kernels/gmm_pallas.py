"""Grouped matmul as Pallas kernels (Triton backend, NVIDIA GPUs), with a custom VJP.

Shapes: A rows (token-expert assignments, sorted by group), G groups (experts), K contraction
width, N output width. `group_sizes[g]` consecutive rows of `lhs` belong to group g; rows past
sum(group_sizes) come out as zeros, as with `jax.lax.ragged_dot`.

Three kernels, one per matmul of a linear layer's forward and backward:
  gmm             out[A, N]    = lhs[A, K] @ rhs[g, K, N]     per row group  (forward)
  gmm, transposed out[A, K]    = dy[A, N] @ rhs[g, K, N]^T    per row group  (d lhs)
  tgmm            out[G, K, N] = lhs[rows g]^T @ dy[rows g]   per group      (d rhs)

`gmm` walks a schedule of work items, one per (row tile, group) pair that overlap: a row tile
that straddles a group boundary is visited once per group, each visit storing only its own rows
(masked store), so groups need not be multiples of the tile. Rows past the last group form a
virtual group G that stores zeros. `tgmm` gives each (group, K tile, N tile) output block one
program that loops over the group's row tiles: the tiles wholly inside the group load without
masks, the (at most two) tiles a group boundary cuts mask the neighbouring groups' rows on load.

`gmm_stacked` runs the forward kernel on layer l of a stack [L, G, K, N] where it lies (inference
inside a layer scan, where slicing the layer out for a custom call would copy it).

Both kernels map a 1-D program id to (row tile, column tile) in bands of `group_m` row tiles, so
the tiles running at the same time share operands in L2 (the usual Triton swizzle).

`interpret=True` runs the same kernels through Pallas' interpreter: that is how CPU tests check
the kernel logic. Kernel correctness oracle: `jax.lax.ragged_dot` (tests/kernels/test_gmm_pallas.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mixtral_jax.kernels import weight_tiles
from mixtral_jax.kernels.common import SMEM_BYTES, exclusive_cumsum, matmul_precision, pow2_at_least


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two, >= 16 for the GPU's matrix units) and launch parameters."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# Chosen by the sweep in bench/gmm_tiles.py on one H200 (bfloat16, 32k rows; BENCHMARKS.md):
# (kernel, K, N) for Mixtral 8x7B's two expert shapes, else the kernel's default. In tgmm,
# block_m steps over rows (its contraction) and block_k, block_n tile its [K, N] output.
TUNED = {
    ("gmm", 4096, 14336): Tiles(128, 256, 64, num_warps=8, num_stages=4),
    ("gmm", 14336, 4096): Tiles(128, 256, 64, num_warps=8, num_stages=3),
    ("gmm_t", 4096, 14336): Tiles(128, 256, 64, num_warps=8, num_stages=4),
    ("gmm_t", 14336, 4096): Tiles(128, 256, 64, num_warps=8, num_stages=4),
    ("tgmm", 4096, 14336): Tiles(64, 256, 128, num_warps=8, num_stages=4),
    ("tgmm", 14336, 4096): Tiles(64, 256, 128, num_warps=8, num_stages=3),
}
DEFAULT = {
    "gmm": Tiles(128, 256, 64, num_warps=8, num_stages=4),
    "gmm_t": Tiles(128, 256, 64, num_warps=8, num_stages=4),
    "tgmm": Tiles(64, 256, 128, num_warps=8, num_stages=3),
}


# Decode (a few rows): the kernel only streams the used experts' weights, so what counts is
# enough programs in flight to saturate memory bandwidth: narrow output columns.
DECODE_ROWS = 64
DECODE = Tiles(16, 64, 256, num_warps=4, num_stages=3)


def tiles_for(kernel: str, k: int, n: int, rows: int, itemsize: int = 2) -> Tiles:
    """Tiles of `kernel` for `rows` rows, weights [K, N] (gmm_t reads the same weights),
    shrunk until the software pipeline's buffers fit in shared memory."""
    if kernel != "tgmm" and rows <= DECODE_ROWS:
        tiles = DECODE
    else:
        tiles = TUNED.get((kernel, k, n), DEFAULT[kernel])
    return _fit_shared_memory(tiles, kernel, itemsize)


def _fit_shared_memory(tiles: Tiles, kernel: str, itemsize: int) -> Tiles:
    def stage_bytes(t):  # one pipeline stage: an lhs tile and an rhs (or dy) tile
        other = t.block_m * t.block_n if kernel == "tgmm" else t.block_k * t.block_n
        return (t.block_m * t.block_k + other) * itemsize

    return shrink_until_fits(tiles, lambda t: t.num_stages * stage_bytes(t), SMEM_BYTES)


def shrink_until_fits(tiles: Tiles, need, limit: int) -> Tiles:
    """`tiles` with fewer pipeline stages (down to 2), then narrower column tiles (down to 16),
    then shorter contraction tiles, until need(tiles) bytes of shared memory fit `limit`."""
    while need(tiles) > limit:
        if tiles.num_stages > 2:
            tiles = dataclasses.replace(tiles, num_stages=tiles.num_stages - 1)
        elif tiles.block_n > 16:
            tiles = dataclasses.replace(tiles, block_n=tiles.block_n // 2)
        else:
            tiles = dataclasses.replace(tiles, block_k=max(16, tiles.block_k // 2))
    return tiles


def fit_tiles(tiles: Tiles, m: int, k: int, n: int) -> Tiles:
    """Shrinks tiles that exceed a (small) problem: no tile larger than the padded dimension."""
    return dataclasses.replace(
        tiles,
        block_m=min(tiles.block_m, pow2_at_least(m)),
        block_n=min(tiles.block_n, pow2_at_least(n)),
        block_k=min(tiles.block_k, pow2_at_least(k)),
    )


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _group_bounds(group_sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """[G] sizes -> [G+1] starts and ends; group G (virtual) is every row past the last group."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    sizes = jnp.concatenate([sizes, (rows - ends[-1])[None]])
    ends = jnp.concatenate([ends, jnp.full((1,), rows, jnp.int32)])
    return ends - sizes, ends


def schedule(group_sizes: jax.Array, rows: int, block_m: int):
    """Work items of `gmm`: (group, row tile) for every overlapping pair, in row order.

    Returns (work_group [W], work_tile [W]) int32, W = rows/block_m + G (the most there can be);
    unused items have group -1. Includes the virtual group G (rows past the last group).
    """
    starts, ends = _group_bounds(group_sizes, rows)
    first = starts // block_m
    last = (ends - 1) // block_m
    tiles = jnp.where(ends > starts, last - first + 1, 0)  # [G+1] row tiles touched per group
    offsets = exclusive_cumsum(tiles)
    num_items = rows // block_m + group_sizes.shape[0]
    item = jnp.arange(num_items, dtype=jnp.int32)
    group = jnp.searchsorted(jnp.cumsum(tiles), item, side="right").astype(jnp.int32)
    valid = item < jnp.sum(tiles)
    group = jnp.minimum(group, tiles.shape[0] - 1)
    tile = first[group] + item - offsets[group]
    return jnp.where(valid, group, -1), jnp.where(valid, tile, 0)


def _swizzle(pid, num_rows, num_cols, group_m):
    """1-D program id -> (row index, column index), walking bands of `group_m` rows."""
    per_band = group_m * num_cols
    band = pid // per_band
    first_row = band * group_m
    band_rows = jnp.minimum(num_rows - first_row, group_m)
    return first_row + (pid % per_band) % band_rows, (pid % per_band) // band_rows


def row_tile(
    tiles: Tiles, num_items: int, num_cols: int, work_group_ref, work_tile_ref, starts_ref, ends_ref
):
    """This program's tile of a forward-shaped grouped kernel (`row_tile_call`): (group, the
    first row and column of its [bm, bn] output block, mask [bm, bn] of the rows inside the
    group). group == num_groups marks rows past the last group, < 0 a tile with no work."""
    bm, bn = tiles.block_m, tiles.block_n
    item, col = _swizzle(pl.program_id(0), num_items, num_cols, tiles.group_m)
    group = work_group_ref[item]
    row0 = pl.multiple_of(work_tile_ref[item] * bm, bm)
    col0 = pl.multiple_of(col * bn, bn)
    rows = row0 + jnp.arange(bm, dtype=jnp.int32)
    start, end = starts_ref[jnp.maximum(group, 0)], ends_ref[jnp.maximum(group, 0)]
    mask = jnp.broadcast_to(((rows >= start) & (rows < end))[:, None], (bm, bn))
    return group, row0, col0, mask


def _gmm_kernel(
    work_group_ref,
    work_tile_ref,
    starts_ref,
    ends_ref,
    layer_ref,
    lhs_ref,
    rhs_ref,
    out_ref,
    *,
    tiles: Tiles,
    num_items: int,
    num_cols: int,
    steps: int,
    num_groups: int,
    transpose_rhs: bool,
    precision,
    dequant: str,
):
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    group, row0, col0, mask = row_tile(
        tiles, num_items, num_cols, work_group_ref, work_tile_ref, starts_ref, ends_ref
    )
    layer = layer_ref[0]
    out_block = out_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]

    @pl.when(group == num_groups)  # rows past the last group
    def _():
        plgpu.store(out_block, jnp.zeros((bm, bn), out_ref.dtype), mask=mask)

    @pl.when((group >= 0) & (group < num_groups))
    def _():
        g = jnp.maximum(group, 0)

        def step(i, acc):
            k0 = pl.multiple_of(i * bk, bk)  # stored rows of rhs (K/2 byte rows for int4)
            if transpose_rhs:
                b = rhs_ref[layer, g, pl.ds(col0, bn), pl.ds(k0, bk)]  # [bn, bk]
                tiles = [weight_tiles.Tile(k0, b)]
                dims = (((1,), (1,)), ((), ()))
            else:  # Tiles [bk, bn]: codes, their scale and offset if rhs is quantized
                tiles = weight_tiles.load(
                    rhs_ref, (layer, g), k0, col0, bk, bn, lhs_ref.dtype, dequant
                )
                dims = (((1,), (0,)), ((), ()))
            for tile in tiles:
                a = lhs_ref[pl.ds(row0, bm), pl.ds(tile.row0, bk)]  # [bm, bk]
                acc = acc + weight_tiles.product(a, tile, precision, dims)
            return acc

        acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
        plgpu.store(out_block, acc.astype(out_ref.dtype), mask=mask)


def _gmm_call(
    lhs, rhs, group_sizes, tiles: Tiles, transpose_rhs: bool, interpret: bool, layer=None
):
    """lhs [A, K] (padded), rhs [G, K, N] (or [G, N, K] transposed) -> [A, N]; shapes divide.

    With `layer` (an int32 scalar), rhs is a stack [L, G, K, N] read at that layer in place.
    rhs may be a `QuantizedWeight` (not transposed): tiles.block_k then counts its stored rows
    and lies in one scale group (gmm_quant.py).
    """
    if layer is None:
        rhs, layer = rhs[None], 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    rows, contract = lhs.shape
    width = rhs.shape[2] if transpose_rhs else rhs.shape[3]
    return row_tile_call(
        _gmm_kernel,
        (layer, lhs, rhs),
        jax.ShapeDtypeStruct((rows, width), lhs.dtype),
        group_sizes=group_sizes,
        tiles=tiles,
        steps=(contract if transpose_rhs else weight_tiles.stored_rows(rhs)) // tiles.block_k,
        num_groups=rhs.shape[1],
        dtype=lhs.dtype,
        name="gmm_t" if transpose_rhs else "gmm",
        interpret=interpret,
        transpose_rhs=transpose_rhs,
        dequant=weight_tiles.dequant_for(interpret),
    )


def row_tile_call(
    kernel,
    operands: tuple,
    out_shape,
    *,
    group_sizes,
    tiles: Tiles,
    steps: int,
    num_groups: int,
    dtype,
    name: str,
    interpret: bool,
    **static,
):
    """A Pallas call of the forward kernels' shape: one program per (work item of `schedule`,
    column tile) of [rows, width] outputs (`out_shape`: one ShapeDtypeStruct or a tuple of them,
    of padded shapes that the tiles divide). `kernel` takes the refs (work_group, work_tile,
    starts, ends, *operands, *outputs) and the keywords tiles, num_items, num_cols, steps,
    num_groups, precision (of `dtype`) and `static`. gmm, gmm_t and gmm_swiglu.py's kernels."""
    rows, width = (out_shape[0] if isinstance(out_shape, tuple) else out_shape).shape
    work_group, work_tile = schedule(group_sizes, rows, tiles.block_m)
    starts, ends = _group_bounds(group_sizes, rows)
    num_items, num_cols = work_group.shape[0], width // tiles.block_n
    return pl.pallas_call(
        functools.partial(
            kernel,
            tiles=tiles,
            num_items=num_items,
            num_cols=num_cols,
            steps=steps,
            num_groups=num_groups,
            precision=matmul_precision(dtype),
            **static,
        ),
        out_shape=out_shape,
        grid=(num_items * num_cols,),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name=name,
    )(work_group, work_tile, starts, ends, *operands)


def _tgmm_kernel(
    starts_ref,
    ends_ref,
    lhs_ref,
    dy_ref,
    out_ref,
    *,
    tiles: Tiles,
    num_k: int,
    num_n: int,
    precision,
):
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    per_group = num_k * num_n
    g = pl.program_id(0) // per_group
    kt, nt = _swizzle(pl.program_id(0) % per_group, num_k, num_n, tiles.group_m)
    k0, n0 = pl.multiple_of(kt * bk, bk), pl.multiple_of(nt * bn, bn)
    start, end = starts_ref[g], ends_ref[g]

    def step(t, acc, masked: bool):
        row0 = pl.multiple_of(t * bm, bm)
        lhs_at = lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)]
        dy_at = dy_ref.at[pl.ds(row0, bm), pl.ds(n0, bn)]
        if masked:  # a tile the group's first or last row cuts: other groups' rows load as 0
            rows = row0 + jnp.arange(bm, dtype=jnp.int32)
            inside = ((rows >= start) & (rows < end))[:, None]
            a = plgpu.load(lhs_at, mask=jnp.broadcast_to(inside, (bm, bk)), other=0)
            b = plgpu.load(dy_at, mask=jnp.broadcast_to(inside, (bm, bn)), other=0)
        else:  # a tile wholly inside the group
            a, b = plgpu.load(lhs_at), plgpu.load(dy_at)  # [bm, bk], [bm, bn]
        return acc + jax.lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    # Row tiles [first, last) touch the group; [whole_first, whole_last) lie inside it and load
    # without masks; the (at most one) cut tile at each end loads masked.
    first = start // bm
    last = jnp.where(end > start, (end - 1) // bm + 1, first)
    whole_first, whole_last = (start + bm - 1) // bm, end // bm
    head_end = jnp.minimum(whole_first, last)
    body_end = jnp.maximum(whole_first, whole_last)
    masked, whole = functools.partial(step, masked=True), functools.partial(step, masked=False)
    acc = jax.lax.fori_loop(first, head_end, masked, jnp.zeros((bk, bn), jnp.float32))
    acc = jax.lax.fori_loop(whole_first, body_end, whole, acc)
    acc = jax.lax.fori_loop(jnp.maximum(body_end, head_end), last, masked, acc)
    out_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)] = acc.astype(out_ref.dtype)


def _tgmm_call(lhs, dy, group_sizes, num_groups: int, tiles: Tiles, interpret: bool):
    """lhs [A, K], dy [A, N] (padded) -> [G, K, N] = per group lhs_g^T @ dy_g."""
    rows, contract = lhs.shape
    width = dy.shape[1]
    starts, ends = _group_bounds(group_sizes, rows)
    num_k, num_n = contract // tiles.block_k, width // tiles.block_n
    kernel = functools.partial(
        _tgmm_kernel, tiles=tiles, num_k=num_k, num_n=num_n, precision=matmul_precision(lhs.dtype)
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, contract, width), lhs.dtype),
        grid=(num_groups * num_k * num_n,),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name="tgmm",
    )(starts, ends, lhs, dy)


# Padded wrappers: every dimension padded to its tile, results sliced back.
def _gmm(lhs, rhs, group_sizes, *, transpose_rhs: bool, interpret: bool, layer=None):
    """gmm with every dimension padded to its tile. With `layer`, rhs is a stack [L, G, ...]."""
    lead = 0 if layer is None else 1
    rows, contract = lhs.shape
    width = rhs.shape[lead + 1] if transpose_rhs else rhs.shape[lead + 2]
    kernel = "gmm_t" if transpose_rhs else "gmm"
    weights_kn = (width, contract) if transpose_rhs else (contract, width)
    tiles = fit_tiles(
        tiles_for(kernel, *weights_kn, rows, lhs.dtype.itemsize), rows, contract, width
    )
    k_axis, n_axis = (lead + 2, lead + 1) if transpose_rhs else (lead + 1, lead + 2)
    lhs_p = _pad_to(_pad_to(lhs, 0, tiles.block_m), 1, tiles.block_k)
    rhs_p = _pad_to(_pad_to(rhs, k_axis, tiles.block_k), n_axis, tiles.block_n)
    out = _gmm_call(lhs_p, rhs_p, group_sizes, tiles, transpose_rhs, interpret, layer=layer)
    return out[:rows, :width]


def _tgmm(lhs, dy, group_sizes, num_groups: int, *, interpret: bool):
    rows, contract = lhs.shape
    width = dy.shape[1]
    tiles = fit_tiles(
        tiles_for("tgmm", contract, width, rows, lhs.dtype.itemsize), rows, contract, width
    )
    # tgmm's block_k tiles the output's K rows; rows of lhs/dy are its contraction.
    lhs_p = _pad_to(_pad_to(lhs, 0, tiles.block_m), 1, tiles.block_k)
    dy_p = _pad_to(_pad_to(dy, 0, tiles.block_m), 1, tiles.block_n)
    out = _tgmm_call(lhs_p, dy_p, group_sizes, num_groups, tiles, interpret)
    return out[:, :contract, :width]


def gmm_stacked(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    layer: jax.Array,
    interpret: bool = False,
) -> jax.Array:
    """gmm(lhs, rhs[layer], group_sizes) reading the stack [L, G, K, N] in place (no gradient).

    Inside a scan over layers, slicing a layer's experts out of the stack for a custom call
    copies them (8x7B: 2.8 GB per layer per decode step); this reads them where they lie.
    For inference: the gradient of a stack would be a stack.
    """
    out = _gmm(lhs, rhs, group_sizes, transpose_rhs=False, interpret=interpret, layer=layer)
    return jax.lax.stop_gradient(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, interpret: bool = False):
    """Grouped matmul: lhs [A, K] @ rhs [G, K, N] over row groups -> [A, N] in lhs's dtype.

    Same contract as `jax.lax.ragged_dot(lhs, rhs, group_sizes)`, differentiable in lhs and rhs.
    """
    return _gmm(lhs, rhs, group_sizes, transpose_rhs=False, interpret=interpret)


def _gmm_fwd(lhs, rhs, group_sizes, interpret):
    out = _gmm(lhs, rhs, group_sizes, transpose_rhs=False, interpret=interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(interpret, residuals, dy):
    lhs, rhs, group_sizes = residuals
    dy = dy.astype(lhs.dtype)
    d_lhs = _gmm(dy, rhs, group_sizes, transpose_rhs=True, interpret=interpret)
    d_rhs = _tgmm(lhs, dy, group_sizes, rhs.shape[0], interpret=interpret)
    return d_lhs, d_rhs.astype(rhs.dtype), None


gmm.defvjp(_gmm_fwd, _gmm_bwd)
