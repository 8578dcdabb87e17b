"""The pure steps every MoE dispatch shares: route, sort by expert, SwiGLU, unsort and combine.

Both the single-device dispatch (`local.py`) and the expert-parallel one (`expert_parallel.py`)
import these; neither imports the other, nor the MoE module (`model/moe.py`).

Letters: M tokens (B*T flattened), A = M*k assignments, E experts, k choices per token,
D embed width, F expert hidden width.
"""

from __future__ import annotations

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


def unsort_and_combine(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """y_sorted: [A, D] rows in sorted order -> [M, D] float32 weighted sum over the k choices."""
    num_tokens, topk = weights.shape
    inverse = jnp.argsort(order)  # sorted position of each assignment
    y = y_sorted[inverse].reshape(num_tokens, topk, -1)  # [M, k, D]
    return jnp.einsum("MkD,Mk->MD", y.astype(jnp.float32), weights)
