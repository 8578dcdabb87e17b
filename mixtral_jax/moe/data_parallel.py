"""The dropless MoE per device on a mesh without an expert axis (issue 17, part 2).

On a data / FSDP mesh (expert axis 1) the dropless dispatch is local: every expert on every
device. Traced on the global token array, its grouped matmul is a Pallas call (our
Pallas-Triton kernel, JAX's megablox) that XLA cannot partition: it all-gathers the tokens and
the sort onto every device and computes the whole batch's MoE on each. (`ragged_dot` XLA
partitions; the kernel plan leaves that path global.) Here the MoE's routing and dispatch
(`model/moe.py`, steps 1-4) run under `jax.shard_map`:

  tokens   x [M, D] split by rows over the mesh's batch axes (LOGICAL_RULES["batch"] of size
           > 1, as `sharding.batch_sharding` splits a batch): each device routes, sorts, runs
           the grouped matmuls and combines its own m = M/P rows (router logits, softmax and
           top-k are per token; outside, XLA:CPU all-gathered the logits for one global top-k);
  weights  replicated inside (in_specs P(); the router and adapters, closed over, likewise):
           XLA all-gathers FSDP-sharded expert weights before the call, as FSDP does for every
           layer anyway; their gradient is the psum of the devices' gradients (shard_map's
           transpose). A tensor axis > 1 gets the whole experts too: correct, but not
           tensor-parallel (each of its devices computes the same rows);
  aux      the routing comes back row-split and `routing_aux` runs outside on it: its sums
           over tokens (tokens per expert, router probability, z-loss) become XLA all-reduces,
           so the aux losses are the one-device values by construction.

Letters as in `ops.py`; P devices on the batch axes, m = M/P rows per device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.parallel import sharding


def moe_per_device(local_fn, x, replicated: tuple, *, mesh: Mesh):
    """local_fn(x, *replicated) on every device over its own token rows.

    Args:
      local_fn: route and dispatch m tokens (`model/moe.py`'s `MoE._route_and_dispatch`):
        ([m, D], *replicated) -> ([m, D] float32, dropped assignments [], `Routing` of m rows).
        What it closes over (the router, adapters) shard_map takes whole, as `replicated`.
      x: [M, D] tokens.
      replicated: whole on every device: expert weights [E, ...] or a one-layer stack
        [1, E, ...] (arrays or `QuantizedWeight`s), a layer index or None.
      mesh: with batch axes > 1 and an expert axis of 1 (`sharding.data_parallel_axes`).
    Returns:
      ([M, D] float32, dropped summed over the devices, `Routing` of the M tokens, row-split).

    M not a multiple of P (decode) is padded with zero rows, routed like any other and cut off
    again: their output and routing leave nothing behind, nor any gradient.
    """
    axes = sharding.data_parallel_axes(mesh)
    if not axes:
        raise ValueError(f"mesh {dict(mesh.shape)} has no batch axis > 1 without an expert axis")
    parts = math.prod(mesh.shape[a] for a in axes)
    num_tokens = x.shape[0]
    x = jnp.pad(x, ((0, -num_tokens % parts), (0, 0)))

    def local(x, replicated):
        out, dropped, routing = local_fn(x, *replicated)
        return out, jax.lax.psum(dropped, axes), routing

    tok = P(axes)
    run = jax.shard_map(
        local, mesh=mesh, in_specs=(tok, P()), out_specs=(tok, P(), tok), check_vma=False
    )
    out, dropped, routing = run(x, tuple(replicated))
    return out[:num_tokens], dropped, jax.tree.map(lambda r: r[:num_tokens], routing)
