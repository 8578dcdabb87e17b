"""JAX's shipped TPU grouped matmul (megablox) under the `grouped_matmul` contract.

`jax.experimental.pallas.ops.tpu.megablox` is the Pallas-Mosaic kernel MaxText trains Mixtral
with on TPU. It is called here, not copied: `backend.gmm` (forward, and d lhs with the weights
transposed) and `backend.tgmm` (d rhs). Shapes: A rows (token-expert assignments sorted by
group), G groups (experts), K contraction width, N output width.

What this module adds around the kernels, and why:

  rows padded   megablox needs A to be a multiple of its row tile tm; the rows are padded with
                zeros to one and cut off again.
  rows masked   megablox visits only the row tiles that hold a group, and stores only a group's
                own rows: rows past sum(group_sizes) (the padding, and the unused tail of the
                expert-parallel receive buffer) are left as uninitialised memory (NaN in
                interpret mode). Our contract, `jax.lax.ragged_dot`'s, is zeros there, in the
                output and in d lhs, so both are masked.
  one VJP       ours, not `ops.gmm`'s: that one reuses the forward's (tm, tk, tn) for the d lhs
                kernel, whose contraction is N and whose output is K; a tile fitted to K < N
                would be an illegal TPU block there. Each kernel gets tiles fitted to its own
                widths (`tiling`).
  empty groups  gmm skips them (no tile) and tgmm writes zeros for them: d rhs of an expert
                that got no tokens is 0, as the oracle's.

Tiles: MaxText's defaults (`tile_batch_seq` 512, `tile_activation_dim` 1024, `tile_weight_dim`
1024 in its base config, used as `min(dim, tile)` per kernel call). A width at most its tile is
one full-width block, always legal; a wider one is cut in tiles of 1024 (a multiple of the
TPU's 128 lanes), the last one partial, which megablox masks. Mixtral 8x7B (D 4096, F 14336)
and 8x22B (6144, 16384) divide evenly.

`interpret=True` runs the same kernels in Pallas' interpreter: how CPU runs them (slowly), and
how the CPU tests check this module against a per-group loop (tests/kernels/test_gmm_megablox.py).
The kernels take float32 and bfloat16 only (`DTYPES`; the kernel plan refuses others).

A Pallas call is not partitioned by XLA: called on arrays sharded over several devices it would
see them whole. The expert-parallel path calls it per device, under `shard_map`.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

# The kernels' module: the package's own `gmm` attribute is ops.gmm (the function), which hides
# the submodule of the same name from `from ... import`.
backend = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

TILE_M, TILE_K, TILE_N = 512, 1024, 1024  # MaxText: tile_batch_seq, _activation_dim, _weight_dim
SUBLANES = 8  # a row tile below TILE_M is rounded up to this (TPU sublane count)
DTYPES = ("float32", "bfloat16")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def tiling(rows: int, contract: int, width: int) -> tuple[int, int, int]:
    """(tm, tk, tn) of one kernel call over `rows` rows, contracting `contract`, producing
    `width` columns: min(dim, MaxText's tile), rows rounded up to whole sublanes."""
    return (
        min(TILE_M, _round_up(rows, SUBLANES)),
        min(contract, TILE_K),
        min(width, TILE_N),
    )


def _valid_rows(x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [A, W] with the rows past sum(group_sizes) set to zero (select: NaN does not leak)."""
    valid = jnp.arange(x.shape[0]) < jnp.sum(group_sizes)  # [A]
    return jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))


def _forward(lhs, rhs, group_sizes, interpret: bool, transpose_rhs: bool = False):
    """backend.gmm on rows already padded to the row tile: [A, K] x [G, K, N] (or [G, N, K]
    with transpose_rhs) -> [A, N] in lhs's dtype, rows past the groups zero."""
    width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = backend.gmm(
        lhs,
        rhs,
        group_sizes,
        preferred_element_type=lhs.dtype,
        tiling=tiling(lhs.shape[0], lhs.shape[1], width),
        transpose_rhs=transpose_rhs,
        interpret=interpret,
    )
    return _valid_rows(out, group_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm_padded(lhs, rhs, group_sizes, interpret):
    return _forward(lhs, rhs, group_sizes, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, interpret):
    return _forward(lhs, rhs, group_sizes, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(interpret, residuals, dy):
    """d lhs [A, K] = dy @ rhs[g]^T per row group; d rhs [G, K, N] = lhs[rows g]^T @ dy[rows g]."""
    lhs, rhs, group_sizes = residuals
    dy = dy.astype(lhs.dtype)
    d_lhs = _forward(dy, rhs, group_sizes, interpret, transpose_rhs=True)
    d_rhs = backend.tgmm(
        lhs.swapaxes(0, 1),  # [K, A]: tgmm contracts lhs's second axis
        dy,
        group_sizes,
        preferred_element_type=rhs.dtype,
        tiling=tiling(lhs.shape[0], lhs.shape[1], dy.shape[1]),
        num_actual_groups=rhs.shape[0],
        interpret=interpret,
    )
    return d_lhs, d_rhs, None


_gmm_padded.defvjp(_gmm_fwd, _gmm_bwd)


def _pad_rows(lhs: jax.Array, width: int) -> jax.Array:
    """lhs [A, K] padded with zero rows to a multiple of the row tile of its kernel calls (the
    row tile depends only on A, so forward and both gradients agree on it)."""
    tm = tiling(lhs.shape[0], lhs.shape[1], width)[0]
    return jnp.pad(lhs, ((0, -lhs.shape[0] % tm), (0, 0)))


def gmm(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, interpret: bool = False
) -> jax.Array:
    """Grouped matmul: lhs [A, K] @ rhs [G, K, N] over row groups -> [A, N] in lhs's dtype.

    Same contract as `jax.lax.ragged_dot(lhs, rhs, group_sizes)` (rows past sum(group_sizes)
    are zeros), differentiable in lhs and rhs. rhs in lhs's dtype; group_sizes [G] int32.
    """
    rows = lhs.shape[0]
    out = _gmm_padded(_pad_rows(lhs, rhs.shape[2]), rhs, group_sizes, interpret)
    return out[:rows]


def gmm_stacked(
    lhs: jax.Array,
    stack: jax.Array,
    group_sizes: jax.Array,
    layer: jax.Array,
    interpret: bool = False,
) -> jax.Array:
    """gmm(lhs, stack[layer], group_sizes) reading the stack [L, G, K, N] where it lies.

    The stack is seen as L*G groups ([L*G, K, N], a reshape of leading axes) with every group
    outside layer `layer` empty: megablox gives empty groups no tile, so it reads only that
    layer's experts, and nothing copies the layer out of the stack (2.8 GB per 8x7B layer and
    decode step). For inference: no gradient.
    """
    num_layers, num_groups = stack.shape[:2]
    flat = stack.reshape(num_layers * num_groups, *stack.shape[2:])  # [L*G, K, N]
    sizes = jax.lax.dynamic_update_slice(
        jnp.zeros((num_layers * num_groups,), jnp.int32),
        group_sizes.astype(jnp.int32),
        (layer * num_groups,),
    )  # [L*G]: layer's sizes in its slot, zeros elsewhere
    rows = lhs.shape[0]
    out = _forward(_pad_rows(lhs, stack.shape[3]), flat, sizes, interpret)
    return jax.lax.stop_gradient(out[:rows])
