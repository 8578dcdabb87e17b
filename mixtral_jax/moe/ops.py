"""The pure steps every MoE dispatch shares: route, sort by expert, SwiGLU, unsort and combine.

Both the single-device dispatch (`local.py`) and the expert-parallel one (`expert_parallel.py`)
import these; neither imports the other, nor the MoE module (`model/moe.py`).

Letters: M tokens (B*T flattened), A = M*k assignments, E experts, k choices per token,
D embed width, F expert hidden width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

# The sort by expert lives with the kernels (expert_decode_grouped.py chunks rows by it too);
# the dispatches import it from here.
from mixtral_jax.kernels.common import (  # noqa: F401 (re-exported)
    exclusive_cumsum,
    group_positions,
    sort_by_expert,
)


@struct.dataclass
class Routing:
    """The router's decision for M tokens.

    Attributes:
      logits: [M, E] float32 router logits.
      weights: [M, k] float32 renormalised top-k probabilities (each row sums to 1).
      experts: [M, k] int32 chosen experts, most probable first.
    """

    logits: jax.Array
    weights: jax.Array
    experts: jax.Array


def route(x: jax.Array, router: jax.Array, topk: int) -> Routing:
    """x: [M, D], router: [D, E] -> Routing. Logits, softmax and weights all in float32."""
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))  # [M, E]
    return route_logits(logits, topk)


def route_logits(logits: jax.Array, topk: int) -> Routing:
    """[..., E] float32 router logits -> Routing with [..., k] weights and experts.

    Hugging Face's semantics: softmax over all E, top-k (ties to the lower expert index, as
    `jax.lax.top_k` orders them), renormalised over the k chosen.
    """
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, topk)  # [..., k], ties -> lower index first
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return Routing(logits=logits, weights=weights, experts=experts.astype(jnp.int32))


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(x W_gate) * (x W_up), given both products."""
    return jax.nn.silu(gate) * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x: jax.Array, rows: jax.Array, inverse: jax.Array, group: int) -> jax.Array:
    """x[rows // group], whose gradient is a gather too (autodiff of the gather would be a
    scatter-add into x, atomics on a GPU).

    Args:
      x: [M, D]; rows: [A] int, A = M * group, a permutation of range(A); inverse: [A], its
        inverse (rows[inverse[a]] == a); group: how many consecutive rows a of the permuted
        range share x's row a // group (k for the sort by expert, 1 for a plain permutation).
    Returns:
      [A, D]. Backward: d x[m] = sum_j dy[inverse[m * group + j]].
    """
    return x[rows // group]


def _take_rows_fwd(x, rows, inverse, group):
    return x[rows // group], inverse


def _take_rows_bwd(group, inverse, dy):
    dx = dy[inverse]  # [A, D] in the unpermuted order a = m * group + j
    if group > 1:
        dx = jnp.sum(dx.reshape(-1, group, dx.shape[-1]), axis=1, dtype=dy.dtype)
    return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def sort_rows(x: jax.Array, order: jax.Array, topk: int) -> jax.Array:
    """x [M, D] -> [A, D], the row of each assignment in sorted order (`sort_by_expert`'s
    order): x[order // topk], differentiated by gathers (`take_rows`)."""
    return take_rows(x, order, jnp.argsort(order), topk)


def unsort_and_combine(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """y_sorted: [A, D] rows in sorted order -> [M, D] float32 weighted sum over the k choices."""
    num_tokens, topk = weights.shape
    inverse = jnp.argsort(order)  # sorted position of each assignment
    y = take_rows(y_sorted, inverse, order, 1).reshape(num_tokens, topk, -1)  # [M, k, D]
    return jnp.einsum("MkD,Mk->MD", y.astype(jnp.float32), weights)
