"""Expert-parallel MoE dispatch (issue 3): tokens travel to their experts by all-to-all over the
mesh's expert axis; expert weights never move.

Each device holds m = M/P tokens (P = devices on the token axes), so A = m*k assignments, and E/X
experts (X = expert-axis size). Two ways to exchange the assignments (`Exchange`):

  capacity  Every local assignment gets a slot (expert e, position p < C) in a send buffer
            [E, C, D] (C = capacity per source device and expert; p >= C is dropped). An
            all_to_all over the expert axis turns [X, E/X, C, D] "to each expert shard" into
            [X, E/X, C, D] "from each source"; the local experts run one batched matmul; a second
            all_to_all returns the results. With C = A (no capacity factor) nothing can be
            dropped, at the cost of an E*A-row buffer. Works on every backend.
  ragged    Dropless. The assignments are sorted by expert (so by destination) and
            `jax.lax.ragged_all_to_all` sends each shard only its rows into an X*A-row receive
            buffer (the worst case: every source sends all of its rows here). The receiver
            regroups the rows by local expert, runs the grouped matmul (`grouped_matmul`), and a
            second ragged_all_to_all returns them. Needs a backend that implements the op: GPU
            and TPU; XLA:CPU does not (jax 0.10.2: "HLO opcode `ragged-all-to-all` is not
            supported by XLA:CPU ThunkEmitter").

The model's exchange is `ComputeConfig.expert_exchange` as the kernel plan resolves it
(`kernel_plan.resolve_exchange`): `auto` takes ragged when there is no capacity factor and the
backend compiles ragged_all_to_all (probed once per platform), else capacity.
`Exchange.RAGGED_EMULATED` is the ragged path with the collective built from a dense all_to_all
(`emulated_ragged_all_to_all`, same semantics): it checks the ragged bookkeeping on CPU and is
never faster than capacity.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.config import Exchange, GmmImpl
from mixtral_jax.kernels.grouped_matmul import grouped_matmul
from mixtral_jax.kernels.plan import resolve_exchange
from mixtral_jax.moe.ops import (
    Routing,
    exclusive_cumsum,
    group_positions,
    sort_by_expert,
    sort_rows,
    swiglu,
    unsort_and_combine,
)
from mixtral_jax.parallel import sharding

TOKEN_AXES = sharding.LOGICAL_RULES["batch"]  # mesh axes that split the tokens
(EXPERT_AXIS,) = sharding.LOGICAL_RULES["experts"]


def _local_capacity(
    x, experts, weights, real, w_gate, w_up, w_down, *, num_experts, capacity, token_axes
):
    """Runs on one device. x: [m, D]; experts, weights: [m, k]; real: [m] bool (False for the
    padding rows added to make the tokens split evenly); w_*: [E/X, ...] local experts."""
    m, d = x.shape
    topk = experts.shape[1]
    pos = group_positions(experts, num_experts)  # [m, k]
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


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` (one slice per peer) from a dense all_to_all: every chunk is
    padded to operand's length. Same result, differentiable; for backends without the op.

    operand: [N, ...]; output: [R, ...]; the four offset/size arrays: [X] int32.
    """
    n, x_shards = operand.shape[0], input_offsets.shape[0]
    r = jnp.arange(n)
    take = jnp.minimum(input_offsets[:, None] + r, n - 1)  # [X, N]
    sent = (r < send_sizes[:, None]).reshape(x_shards, n, *([1] * (operand.ndim - 1)))
    chunks = jnp.where(sent, operand[take], 0)  # [X, N, ...] by destination
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # [X, N, ...] by source
    starts = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # [X] by source
    dest = jnp.where(r < recv_sizes[:, None], starts[:, None] + r, output.shape[0])  # [X, N]
    return output.at[dest.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


def _local_ragged(
    x, experts, weights, w_gate, w_up, w_down, *, num_experts, x_shards, collective, gmm_impl
):
    """Runs on one device; the dropless ragged exchange. x: [m, D]; experts, weights: [m, k];
    w_*: [E/X, ...] local experts. Returns ([m, D] float32, 0 dropped)."""
    m, d = x.shape
    topk = experts.shape[1]
    a, local_e = m * topk, num_experts // x_shards
    order, group_sizes = sort_by_expert(experts, num_experts)  # [A], [E]
    x_sorted = sort_rows(x, order, topk)  # [A, D] by expert, so by destination shard
    send_groups = group_sizes.reshape(x_shards, local_e)  # [X, E/X] by destination
    send_sizes = send_groups.sum(axis=1)  # [X]
    send_offsets = exclusive_cumsum(send_sizes)
    # [X, E/X] rows each source sends here, per local expert
    recv_groups = jax.lax.all_to_all(send_groups, EXPERT_AXIS, 0, 0, tiled=True)
    recv_sizes = recv_groups.sum(axis=1)  # [X]
    recv_offsets = exclusive_cumsum(recv_sizes)  # where each source's rows start here
    # where this device's rows start on each receiver
    remote_offsets = jax.lax.all_to_all(recv_offsets, EXPERT_AXIS, 0, 0, tiled=True)
    buf = collective(
        x_sorted,
        jnp.zeros((x_shards * a, d), x.dtype),
        send_offsets,
        send_sizes,
        remote_offsets,
        recv_sizes,
        axis_name=EXPERT_AXIS,
    )  # [X*A, D]
    # buf is source-major, expert-minor; regroup by local expert (unused rows sort last).
    seg_ends = jnp.cumsum(recv_groups.reshape(-1))  # [X*E/X]
    seg = jnp.searchsorted(seg_ends, jnp.arange(x_shards * a), side="right")  # [X*A]
    local_expert = jnp.where(seg < x_shards * local_e, seg % local_e, local_e)
    regroup = jnp.argsort(local_expert, stable=True)  # [X*A]
    rows, sizes = buf[regroup], recv_groups.sum(axis=0)  # [X*A, D], [E/X]

    def gmm(lhs, w):
        return grouped_matmul(lhs, w, sizes, gmm_impl)

    y = gmm(swiglu(gmm(rows, w_gate), gmm(rows, w_up)), w_down)  # [X*A, D], unused rows zero
    y = y[jnp.argsort(regroup)]  # back to buf's order
    # The way back: each source's rows return to where they left its sorted send buffer.
    origin = jax.lax.all_to_all(send_offsets, EXPERT_AXIS, 0, 0, tiled=True)  # [X] by source
    y_sorted = collective(
        y,
        jnp.zeros((a, d), y.dtype),
        recv_offsets,
        recv_sizes,
        origin,
        send_sizes,
        axis_name=EXPERT_AXIS,
    )  # [A, D]
    return unsort_and_combine(y_sorted, order, weights), jnp.zeros((), jnp.int32)


def moe_expert_parallel(
    x,
    routing: Routing,
    w_gate,
    w_up,
    w_down,
    *,
    mesh: Mesh,
    capacity_factor: float | None = None,
    exchange: Exchange | str = Exchange.AUTO,
    gmm_impl: GmmImpl | str = GmmImpl.AUTO,
):
    """Expert-parallel MoE. x: [M, D]; w_gate, w_up: [E, D, F]; w_down: [E, F, D].

    capacity_factor None = no drop; else (capacity exchange only) capacity per source device and
    expert = ceil(factor * m * k / E). exchange: see `Exchange`; gmm_impl: the ragged exchange's
    grouped matmul. Returns ([M, D] float32, dropped assignments).
    """
    num_experts = w_gate.shape[0]
    x_size = mesh.shape[EXPERT_AXIS]
    if num_experts % x_size:
        raise ValueError(f"{num_experts} experts cannot be split over expert axis of size {x_size}")
    exchange = resolve_exchange(exchange, mesh, capacity_factor)
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
    tok, ex = P(token_axes), P(EXPERT_AXIS)
    if exchange == Exchange.CAPACITY:
        capacity = m * topk
        if capacity_factor is not None:
            capacity = max(1, math.ceil(capacity_factor * m * topk / num_experts))
        fn = partial(
            _local_capacity, num_experts=num_experts, capacity=capacity, token_axes=token_axes
        )
        args, in_specs = (x, experts, weights, real), (tok, tok, tok, tok)
    else:
        collective = (
            jax.lax.ragged_all_to_all if exchange == Exchange.RAGGED else emulated_ragged_all_to_all
        )
        fn = partial(
            _local_ragged,
            num_experts=num_experts,
            x_shards=x_size,
            collective=collective,
            gmm_impl=gmm_impl,
        )
        args, in_specs = (x, experts, weights), (tok, tok, tok)
    run = jax.shard_map(
        fn, mesh=mesh, in_specs=(*in_specs, ex, ex, ex), out_specs=(tok, P()), check_vma=False
    )
    out, dropped = run(*args, w_gate, w_up, w_down)
    return out[:num_tokens], dropped
