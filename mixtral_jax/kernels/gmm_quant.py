"""Grouped matmul over quantized expert weights (prefill): gmm_pallas's kernel reading codes.

  gmm          lhs [A, K] @ rhs [G, K, N] per row group, rhs a `QuantizedWeight` (int8 / int4)
  gmm_stacked  the same on layer l of a quantized stack [L, G, K, N], read in place

Same contract as `gmm_pallas.gmm` (and `jax.lax.ragged_dot` on the dequantized weight): rows
past sum(group_sizes) come out as zeros. The forward kernel is gmm_pallas's: each step's code
tile comes as integer codes in lhs's dtype and the float32 partial product is scaled per group
(`weight_tiles.load`), so only codes and scales cross memory. Tiles are gmm_pallas's, with
block_k cut to lie in one scale group and block_n to divide N: a quantized stack is never
padded (that would copy it).

From DEQUANTIZE_ROWS rows on, the work is arithmetic, not bytes: the forward dequantizes the
weight to lhs's dtype (XLA, one pass over the codes, a transient [G, K, N] copy) and runs the
bf16 kernel, which keeps the matrix units busier than the codes-reading one (H200, 8x7B
expert shapes, 8,192 rows: 3.7-3.8 ms per matrix reading int8 or int4 codes, 2.0-2.1 ms in
bf16; the dequantization is ~1.4 GB of traffic, ~0.4 ms by bytes: to be measured).

Gradient: the quantized weights are a frozen base (QLoRA-style fine-tuning of what feeds them):
`gmm` has the lhs gradient, dy @ rhs^T through gmm_pallas's transposed kernel on the weight
dequantized by XLA (a transient [G, K, N] copy in lhs's dtype, backward only), and passes no
gradient to codes or scales (the scales go in through stop_gradient). `gmm_stacked` is for
inference: no gradient.

Letters: A rows, G groups (experts), K contraction width, N output width, L layers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mixtral_jax.kernels import gmm_pallas, quant, weight_tiles
from mixtral_jax.kernels.quant import QuantizedWeight


def _largest_pow2_dividing(n: int, at_most: int) -> int:
    size = at_most
    while n % size:
        size //= 2
    return size


def tiles_for(
    rhs: QuantizedWeight, rows: int, itemsize: int, base: gmm_pallas.Tiles | None = None
) -> gmm_pallas.Tiles:
    """Tiles for `rows` rows (gmm_pallas's for the shape, or `base`), fitted to the quantized
    weight: block_k stored rows inside one scale group, block_n dividing N.

    Raises:
      ValueError: a weight the kernel cannot tile (N or the group's stored rows not a multiple
        of 16, the matrix units' smallest tile).
    """
    k, n = rhs.shape[-2:]
    if n % 16 or weight_tiles.max_block_k(rhs) % 16:
        raise ValueError(
            f"the quantized gmm needs N and gcd(stored rows, group size) multiples of 16; got "
            f"N={n}, K={k}, bits={rhs.bits}, group_size={rhs.group_size}"
        )
    tiles = base or gmm_pallas.tiles_for("gmm", k, n, rows, itemsize)
    tiles = gmm_pallas.fit_tiles(tiles, rows, k, n)
    tiles = dataclasses.replace(
        tiles,
        block_k=_largest_pow2_dividing(weight_tiles.max_block_k(rhs), tiles.block_k),
        block_n=_largest_pow2_dividing(n, tiles.block_n),
    )
    return _fit_shared_memory(tiles, weight_tiles.tiles_per_step(rhs), itemsize)


# Shared memory per block on the H200 (227 KiB). The pipeline's stages hold lhs tiles (two per
# step for int4) and code tiles; the dequantized tiles are staged on top, once, for the matrix
# units (H200: int4 at 128 x 256 x 64 asked 4 x 48 KiB + 54 KiB and failed, 3 stages ran).
SMEM_LIMIT = 227 * 1024


def _fit_shared_memory(tiles: gmm_pallas.Tiles, x_tiles: int, itemsize: int) -> gmm_pallas.Tiles:
    def need(t):
        stage = x_tiles * t.block_m * t.block_k * itemsize + t.block_k * t.block_n
        return t.num_stages * stage + x_tiles * t.block_k * t.block_n * itemsize

    return gmm_pallas.shrink_until_fits(tiles, need, SMEM_LIMIT)


DEQUANTIZE_ROWS = 4096


def _forward(lhs, rhs: QuantizedWeight, group_sizes, interpret: bool, layer=None):
    """The kernel on lhs padded to whole row tiles; rhs [G, K, N] or [L, G, K, N] with layer."""
    weight_tiles.check_codes(rhs)
    rows, k = lhs.shape
    if k != rhs.shape[-2]:
        raise ValueError(f"lhs has K={k} columns, the quantized weight {rhs.shape[-2]} rows")
    if rows >= DEQUANTIZE_ROWS:
        w = quant.dequantize(rhs if layer is None else rhs[layer], lhs.dtype)  # [G, K, N]
        return gmm_pallas._gmm(lhs, w, group_sizes, transpose_rhs=False, interpret=interpret)
    tiles = tiles_for(rhs, rows, lhs.dtype.itemsize)
    lhs_p = jnp.pad(lhs, ((0, -rows % tiles.block_m), (0, 0)))
    out = gmm_pallas._gmm_call(lhs_p, rhs, group_sizes, tiles, False, interpret, layer=layer)
    return out[:rows]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _gmm(lhs, codes, scale, group_sizes, bits: int, interpret: bool):
    return _forward(lhs, QuantizedWeight(codes, scale, bits), group_sizes, interpret)


def _gmm_fwd(lhs, codes, scale, group_sizes, bits, interpret):
    out = _forward(lhs, QuantizedWeight(codes, scale, bits), group_sizes, interpret)
    return out, (codes, scale, group_sizes)


def _gmm_bwd(bits, interpret, residuals, dy):
    codes, scale, group_sizes = residuals
    w = quant.dequantize(QuantizedWeight(codes, scale, bits), dy.dtype)  # [G, K, N]
    d_lhs = gmm_pallas._gmm(dy, w, group_sizes, transpose_rhs=True, interpret=interpret)
    return d_lhs, None, jnp.zeros_like(scale), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array, rhs: QuantizedWeight, group_sizes: jax.Array, interpret: bool = False
) -> jax.Array:
    """Grouped matmul: lhs [A, K] @ dequantize(rhs) [G, K, N] over row groups -> [A, N].

    Args:
      lhs: [A, K] rows sorted by group, in the compute dtype.
      rhs: QuantizedWeight [G, K, N] (int8 or int4, any group size the kernel tiles).
      group_sizes: [G] int32, summing to at most A.
    Returns:
      [A, N] in lhs's dtype; differentiable in lhs only (see the module docstring).
    """
    group_sizes = group_sizes.astype(jnp.int32)
    return _gmm(lhs, rhs.codes, jax.lax.stop_gradient(rhs.scale), group_sizes, rhs.bits, interpret)


def gmm_stacked(
    lhs: jax.Array,
    rhs: QuantizedWeight,
    group_sizes: jax.Array,
    layer: jax.Array,
    interpret: bool = False,
) -> jax.Array:
    """gmm(lhs, rhs[layer], group_sizes) reading the quantized stack [L, G, K, N] in place
    (inside a layer scan, where slicing the layer out for a custom call would copy it).
    Inference only: no gradient."""
    out = _forward(lhs, rhs, group_sizes.astype(jnp.int32), interpret, layer=layer)
    return jax.lax.stop_gradient(out)
