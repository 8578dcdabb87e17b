"""The dropless MoE with LoRA adapters on the experts: the low-rank term of every projection
runs through the same grouped matmul as the base, per expert on the sorted rows.

  gate = x_e W_gate[e] + (x_e A_gate[e]) B_gate[e] * s      (w_up, w_down alike; s = alpha / r)

x_e are the rows sorted to expert e; A [E, D, r], B [E, r, F] are grouped matmuls of width r
(cheap at r = 16 beside D, F = 4096, 14336). A projection without an adapter is the base alone,
so with B = 0 the output equals `local.moe_dropless` bit for bit. Letters as in `ops.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.config import GmmImpl
from mixtral_jax.kernels.grouped_matmul import grouped_matmul, grouped_matmul_stacked
from mixtral_jax.moe.ops import sort_by_expert, sort_rows, swiglu, unsort_and_combine


def moe_dropless_lora(
    x,
    routing,
    w_gate,
    w_up,
    w_down,
    adapters: dict,
    scale: float,
    gmm_impl: GmmImpl = GmmImpl.AUTO,
    layer: jax.Array | None = None,
):
    """`local.moe_dropless` plus the adapters' low-rank terms.

    Args:
      x: [M, D]; routing: a `Routing`; w_*: the base, [E, ...] (or stacks [L, E, ...] at
        `layer`, read in place as `moe_dropless` does).
      adapters: {"w_gate" | "w_up" | "w_down": (A [E, in, r], B [E, r, out])}, any subset.
      scale: alpha / r.
    Returns:
      ([M, D] float32, dropped = 0).
    """
    topk = routing.experts.shape[1]
    order, group_sizes = sort_by_expert(routing.experts, w_gate.shape[-3])
    x_sorted = sort_rows(x, order, topk)  # [A, D]

    def base(lhs, w):
        if layer is None:
            return grouped_matmul(lhs, w, group_sizes, gmm_impl)
        return grouped_matmul_stacked(lhs, w, group_sizes, layer, gmm_impl)

    def project(lhs, w, name):
        y = base(lhs, w)  # [A, out]
        if name not in adapters:
            return y
        a, b = adapters[name]
        xa = grouped_matmul(lhs, a.astype(lhs.dtype), group_sizes, gmm_impl)  # [A, r]
        term = grouped_matmul(xa, b.astype(lhs.dtype), group_sizes, gmm_impl)  # [A, out]
        return y + term * jnp.asarray(scale, term.dtype)

    h = swiglu(project(x_sorted, w_gate, "w_gate"), project(x_sorted, w_up, "w_up"))  # [A, F]
    y_sorted = project(h, w_down, "w_down")  # [A, D]
    return unsort_and_combine(y_sorted, order, routing.weights), jnp.zeros((), jnp.int32)
