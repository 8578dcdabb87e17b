"""The MoE dispatch on one device: four implementations of the same function.

  dense     every expert on every token, weighted by routing (the oracle);
  dropless  stable sort by expert, `grouped_matmul` over ragged groups;
  gathered  a few tokens: gather the chosen experts' weights, no sort (reads M*k matrices);
  capacity  stable sort, gather into [E, C, D] slots, batched matmul; assignments past an
            expert's C slots are dropped (earlier tokens win).

Each takes x [M, D], a `Routing` and the expert weights w_gate, w_up [E, D, F], w_down [E, F, D],
and returns ([M, D] float32 output, dropped assignments). Which one runs is the kernel plan's
decision (`model/moe.py`'s `dispatch`). Letters as in `ops.py`; C capacity slots per expert.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.config import GmmImpl
from mixtral_jax.kernels.grouped_matmul import (
    grouped_expert_ffn,
    grouped_matmul,
    grouped_matmul_stacked,
)
from mixtral_jax.kernels.quant import QuantizedWeight
from mixtral_jax.moe.ops import (
    exclusive_cumsum,
    sort_by_expert,
    sort_rows,
    swiglu,
    unsort_and_combine,
)


def moe_dense(x, routing, w_gate, w_up, w_down):
    """Oracle: every expert computes every token; unchosen experts get weight 0.

    x: [M, D]; w_gate, w_up: [E, D, F]; w_down: [E, F, D] -> ([M, D] float32, dropped=0).
    """
    num_experts = w_gate.shape[0]
    combine = jnp.sum(
        jax.nn.one_hot(routing.experts, num_experts) * routing.weights[..., None], axis=1
    )  # [M, E]
    h = swiglu(jnp.einsum("MD,EDF->EMF", x, w_gate), jnp.einsum("MD,EDF->EMF", x, w_up))
    y = jnp.einsum("EMF,EFD->EMD", h, w_down)  # [E, M, D]
    out = jnp.einsum("EMD,ME->MD", y.astype(jnp.float32), combine)
    return out, jnp.zeros((), jnp.int32)


def moe_dropless(
    x,
    routing,
    w_gate,
    w_up,
    w_down,
    gmm_impl: GmmImpl = GmmImpl.AUTO,
    layer: jax.Array | None = None,
    fused_swiglu: bool = False,
):
    """Sort by expert, one grouped matmul per projection (kernel: `gmm_impl`, as the kernel plan
    resolved it; `auto` resolves by platform), none dropped.

    With `layer`, w_* are stacks [L, E, ...] used at that layer (`grouped_matmul_stacked`).
    With `fused_swiglu` (and no `layer`), the expert FFN runs as `grouped_expert_ffn`: gate and
    up one grouped matmul with the SwiGLU fused, its backward fused into that of the down
    projection.
    """
    topk = routing.experts.shape[1]
    order, group_sizes = sort_by_expert(routing.experts, w_gate.shape[-3])
    x_sorted = sort_rows(x, order, topk)  # [A, D]
    if layer is None:

        def gmm(lhs, w):
            return grouped_matmul(lhs, w, group_sizes, gmm_impl)
    else:

        def gmm(lhs, w):
            return grouped_matmul_stacked(lhs, w, group_sizes, layer, gmm_impl)

    float_weights = not any(isinstance(w, QuantizedWeight) for w in (w_gate, w_up, w_down))
    if fused_swiglu and layer is None and float_weights:  # codes go through `gmm`
        y_sorted = grouped_expert_ffn(x_sorted, w_gate, w_up, w_down, group_sizes, gmm_impl)
    else:
        h = swiglu(gmm(x_sorted, w_gate), gmm(x_sorted, w_up))  # [A, F]
        y_sorted = gmm(h, w_down)  # [A, D]
    return unsort_and_combine(y_sorted, order, routing.weights), jnp.zeros((), jnp.int32)


def moe_gathered(x, routing, w_gate, w_up, w_down):
    """Few-token path (decode): gather only the chosen experts' weights, no sort, no grouped matmul.

    Reads M*k expert matrices instead of all E; measured faster only for one token (batch-1
    decode of Mixtral: 2 of 8 experts), so `dispatch` uses it only there. Same maths as
    moe_dropless (nothing dropped).
    x: [M, D]; w_gate, w_up: [E, D, F]; w_down: [E, F, D] -> ([M, D] float32, dropped=0).
    """
    g = w_gate[routing.experts]  # [M, k, D, F]
    u = w_up[routing.experts]  # [M, k, D, F]
    dn = w_down[routing.experts]  # [M, k, F, D]
    h = swiglu(jnp.einsum("MD,MkDF->MkF", x, g), jnp.einsum("MD,MkDF->MkF", x, u))
    y = jnp.einsum("MkF,MkFD->MkD", h, dn)  # [M, k, D]
    out = jnp.einsum("MkD,Mk->MD", y.astype(jnp.float32), routing.weights)
    return out, jnp.zeros((), jnp.int32)


def moe_capacity(x, routing, w_gate, w_up, w_down, capacity: int):
    """Sort by expert, gather into [E, C, D] slots, batched matmul, gather back.

    Assignment a sits at position p = a's rank inside its expert's group; it is kept iff p < C.
    Returns ([M, D] float32, number of dropped assignments).
    """
    num_experts, topk = w_gate.shape[0], routing.experts.shape[1]
    order, group_sizes = sort_by_expert(routing.experts, num_experts)
    num_assign = order.shape[0]
    group_start = exclusive_cumsum(group_sizes)  # [E]
    # Dispatch: slot (e, c) takes sorted row group_start[e] + c, or a zero row if c is unused.
    x_sorted = jnp.concatenate([sort_rows(x, order, topk), jnp.zeros_like(x[:1])])  # [A + 1, D]
    c = jnp.arange(capacity)[None, :]  # [1, C]
    src = jnp.where(c < group_sizes[:, None], group_start[:, None] + c, num_assign)  # [E, C]
    buffer = x_sorted[src]  # [E, C, D]
    h = swiglu(jnp.einsum("ECD,EDF->ECF", buffer, w_gate), jnp.einsum("ECD,EDF->ECF", buffer, w_up))
    y_buf = jnp.einsum("ECF,EFD->ECD", h, w_down)  # [E, C, D]
    # Return: sorted row r of expert e at rank p reads slot (e, p), or a zero row if dropped.
    sorted_expert = routing.experts.reshape(-1)[order]  # [A]
    rank = jnp.arange(num_assign) - group_start[sorted_expert]
    slot = jnp.where(rank < capacity, sorted_expert * capacity + rank, num_experts * capacity)
    y_flat = jnp.concatenate([y_buf.reshape(num_experts * capacity, -1), jnp.zeros_like(x[:1])])
    y_sorted = y_flat[slot]  # [A, D]
    dropped = jnp.sum(jnp.maximum(group_sizes - capacity, 0))
    return unsort_and_combine(y_sorted, order, routing.weights), dropped
