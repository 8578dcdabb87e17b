"""Expert-parallel MoE dispatch (issue 3): tokens travel to their experts by all-to-all over the
mesh's expert axis; expert weights never move.

Each device holds M/P tokens (P = devices on the token axes) and E/X experts (X = expert-axis size).
Per device, every local assignment gets a slot (expert e, position p < C) in a send buffer
[E, C, D] (C = capacity per source device and expert; p >= C is dropped). An all-to-all over the
expert axis turns [X, E/X, C, D] "to each expert shard" into [X, E/X, C, D] "from each source";
the local experts run one batched matmul; a second all-to-all returns the results, which are
gathered back per assignment and combined with the router weights.

Fixed capacity only: with capacity >= M/P * k nothing can be dropped (exactly dropless, at the
cost of the buffer size). A ragged_all_to_all dropless path is NOT implemented.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax import sharding
from mixtral_jax.moe import Routing, swiglu

TOKEN_AXES = sharding.LOGICAL_RULES["batch"]  # mesh axes that split the tokens
(EXPERT_AXIS,) = sharding.LOGICAL_RULES["experts"]


def slots(experts: jax.Array, num_experts: int) -> jax.Array:
    """experts: [m, k] int32 -> [m, k] position of each assignment inside its expert's group
    (assignments in token order, stable)."""
    flat = experts.reshape(-1)  # [A]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts)
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    rank = jnp.zeros_like(flat).at[order].set(jnp.arange(flat.shape[0], dtype=flat.dtype))
    return (rank - group_start[flat]).reshape(experts.shape)


def _local(x, experts, weights, real, w_gate, w_up, w_down, *, num_experts, capacity,
           token_axes):
    """Runs on one device. x: [m, D]; experts, weights: [m, k]; real: [m] bool (False for the
    padding rows added to make the tokens split evenly); w_*: [E/X, ...] local experts."""
    m, d = x.shape
    topk = experts.shape[1]
    pos = slots(experts, num_experts)  # [m, k]
    keep = pos < capacity
    tok = jnp.broadcast_to(jnp.arange(m)[:, None], (m, topk))
    send = jnp.zeros((num_experts, capacity, d), x.dtype)
    send = send.at[experts, pos].set(x[tok], mode="drop")  # [E, C, D], p >= C dropped
    x_shards = jax.lax.psum(1, EXPERT_AXIS)
    local_e = num_experts // x_shards
    send = send.reshape(x_shards, local_e, capacity, d)  # [X, E/X, C, D] by destination
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # [X, E/X, C, D] by source
    h = swiglu(jnp.einsum("SECD,EDF->SECF", recv, w_gate), jnp.einsum("SECD,EDF->SECF", recv, w_up))
    y = jnp.einsum("SECF,EFD->SECD", h, w_down)
    back = jax.lax.all_to_all(y, EXPERT_AXIS, 0, 0, tiled=True)  # [X, E/X, C, D] by destination
    back = back.reshape(num_experts, capacity, d)
    y_a = back[experts, jnp.minimum(pos, capacity - 1)]  # [m, k, D]
    w = jnp.where(keep, weights, 0.0)
    out = jnp.einsum("mkD,mk->mD", y_a.astype(jnp.float32), w)
    dropped = jax.lax.psum(jnp.sum(~keep & real[:, None]).astype(jnp.int32), token_axes)
    return out, dropped


def moe_expert_parallel(x, routing: Routing, w_gate, w_up, w_down, *, mesh: Mesh,
                        capacity_factor: float | None = None):
    """Expert-parallel MoE. x: [M, D]; w_gate, w_up: [E, D, F]; w_down: [E, F, D].

    capacity_factor None = no drop (capacity = local tokens * k); else capacity per source device
    and expert = ceil(factor * m * k / E). Returns ([M, D] float32, dropped assignments).
    """
    num_experts = w_gate.shape[0]
    x_size = mesh.shape[EXPERT_AXIS]
    if num_experts % x_size:
        raise ValueError(f"{num_experts} experts cannot be split over expert axis of size {x_size}")
    token_axes = tuple(a for a in TOKEN_AXES if mesh.shape[a] > 1) or (EXPERT_AXIS,)
    parts = math.prod(mesh.shape[a] for a in token_axes)
    # Pad the tokens to split evenly (decode has fewer tokens than devices): padding rows come
    # last, carry zero router weights, and are not counted as dropped.
    num_tokens = x.shape[0]
    pad = -num_tokens % parts
    real = jnp.arange(num_tokens + pad) < num_tokens
    experts, weights = routing.experts, routing.weights
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        experts = jnp.pad(experts, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
    m, topk = x.shape[0] // parts, experts.shape[1]
    if capacity_factor is None:
        capacity = m * topk
    else:
        capacity = max(1, math.ceil(capacity_factor * m * topk / num_experts))
    tok = P(token_axes)
    fn = partial(_local, num_experts=num_experts, capacity=capacity, token_axes=token_axes)
    run = jax.shard_map(
        fn, mesh=mesh,
        in_specs=(tok, tok, tok, tok, P(EXPERT_AXIS), P(EXPERT_AXIS), P(EXPERT_AXIS)),
        out_specs=(tok, P()), check_vma=False)
    out, dropped = run(x, experts, weights, real, w_gate, w_up, w_down)
    return out[:num_tokens], dropped


expert_parallel = sharding.active  # the context that makes MoE layers expert-parallel


def active_mesh() -> Mesh | None:
    """The active mesh (sharding.active) when its expert axis is > 1, else None."""
    mesh = sharding.active_mesh()
    if mesh is not None and mesh.shape[EXPERT_AXIS] > 1:
        return mesh
    return None
