"""What the Pallas kernels share: the shared-memory budget, in-kernel dot and its precision, tile
rounding, the decode kernels' token limits, tiles and tile fitting, and the sort of token-expert
assignments by expert with the exclusive cumsum of group sizes (kernel schedules and MoE dispatch
alike; `moe/ops.py` re-exports them).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

SMEM_BYTES = 200 * 1024  # H100/H200 allow 227 KiB per block; leave room for the epilogue


MAX_TOKENS = 64  # above this every slot computing all tokens wastes too much arithmetic
# The grouped-rows decode kernels' limit (expert_decode_grouped.py; the sorted grouped matmul
# above it). At Mixtral 8x7B widths 512 tokens are 1,024 token-expert rows: 11.5 TFLOP a
# 32-layer step, ~18 ms at 650 TFLOP/s against the 21.7 ms of reading the weights once, so the
# step is still about memory-bound; chunks padded to R rows (up to ~1.5x the rows at 512) make it
# compute-bound past that, where the grouped matmul's training tiles belong. A guess until the
# H200 sweep (bench/expert_decode_grouped.py --tokens 512) measures the crossover.
MAX_GROUPED_TOKENS = 512


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """Column tile, contraction tile, splits of the contraction (down only), launch parameters."""

    block_n: int = 64
    block_k: int = 128
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 4


def supports(*widths: int) -> bool:
    """Every width a multiple of 16 (the matrix units' smallest tile): the decode kernels tile
    weight stacks exactly, since padding a stack would copy it."""
    return all(w % 16 == 0 for w in widths)


def _largest_pow2_dividing(n: int, at_most: int) -> int:
    size = at_most
    while n % size:
        size //= 2
    return size


def fit(
    tiles: DecodeTiles,
    rows: int,
    contract: int,
    width: int,
    streams: int,
    itemsize: int,
    *,
    group: int | None = None,
    weight_itemsize: int | None = None,
    x_tiles: int = 1,
) -> DecodeTiles:
    """Tiles that divide the problem exactly (no padding of weight stacks, which would copy them)
    and whose pipeline fits in shared memory. `streams` weight tiles are loaded per step.

    Quantized weights (weight_tiles.py): `contract` counts stored rows, block_k also divides
    `group` (a step's tile lies in one scale group), weight tiles take `weight_itemsize` bytes
    per element and each step reads `x_tiles` tiles of x (2 for int4)."""
    block_n = _largest_pow2_dividing(width, tiles.block_n)
    splits = tiles.splits
    while splits > 1 and (contract % splits or (contract // splits) % 16):
        splits -= 1
    block_k = _largest_pow2_dividing(math.gcd(contract // splits, group or contract), tiles.block_k)
    stages = tiles.num_stages
    w_itemsize = itemsize if weight_itemsize is None else weight_itemsize

    def smem(stages, block_n, block_k):  # the pipeline's buffers: x or h tile + weight tiles
        x_bytes = x_tiles * rows * block_k * itemsize
        return stages * (x_bytes + streams * block_k * block_n * w_itemsize)

    while smem(stages, block_n, block_k) > SMEM_BYTES:
        if stages > 2:
            stages -= 1
        elif block_n > 16:
            block_n //= 2
        else:
            block_k //= 2  # halving a power of two that divides still divides
    return dataclasses.replace(
        tiles, block_n=block_n, block_k=block_k, splits=splits, num_stages=stages
    )


def pow2_at_least(n: int, low: int = 16) -> int:
    """The smallest power of two >= n and >= low (a tile that covers n rows)."""
    return max(low, 1 << max(0, (n - 1).bit_length()))


def matmul_precision(dtype):
    """In-kernel dot precision: full float32 for float32 operands (else Triton uses tf32)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def exclusive_cumsum(sizes: jax.Array) -> jax.Array:
    """[n] -> [n] start offset of each consecutive group of the given sizes."""
    return jnp.cumsum(sizes) - sizes


def sort_by_expert(experts: jax.Array, num_experts: int):
    """Stable sort of the A = M*k assignments by expert.

    Args:
      experts: [M, k] int32.
    Returns:
      order: [A] assignment index (m*k + j) of each sorted row.
      group_sizes: [E] int32 rows per expert.
    """
    flat = experts.reshape(-1)  # [A]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def group_positions(experts: jax.Array, num_experts: int) -> jax.Array:
    """experts: [M, k] int32 -> [M, k] position of each assignment inside its expert's group
    (assignments in token order, stable: earlier tokens first): how many assignments before it,
    in the flat order a = m*k + j, chose the same expert. A running count over a one-hot [A, E]
    (fused elementwise work), not a sort and a scatter: `sort_by_expert`'s stable rank minus its
    group's offset, the same integers (H200, 256-row decode step: the sort and the rank's
    scatter were ~0.4 ms of its 32)."""
    flat = experts.reshape(-1)  # [A]
    hot = (flat[:, None] == jnp.arange(num_experts, dtype=flat.dtype)).astype(jnp.int32)  # [A, E]
    before = jnp.cumsum(hot, axis=0) - hot  # [A, E] earlier assignments of each expert
    return jnp.take_along_axis(before, flat[:, None], axis=1).reshape(experts.shape)
