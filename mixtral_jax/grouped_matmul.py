"""The one grouped-matmul entry point of the dropless MoE path.

`grouped_matmul(lhs, rhs, group_sizes)` multiplies consecutive row groups of `lhs` by their own
matrix of `rhs`. Everything the dropless path needs from a kernel goes through this function, so
a faster kernel replaces it in one place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Rows [start_e, start_e + group_sizes[e]) of lhs times rhs[e], for every group e.

    Args:
      lhs: [A, D] rows sorted by group (A = assignments, D = contraction width).
      rhs: [E, D, F] one matrix per group.
      group_sizes: [E] int32, summing to at most A; rows past the sum come out as zeros.
    Returns:
      [A, F] in lhs's dtype.
    """
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
