"""The local dropless MoE per device on a mesh without an expert axis (issue 17, part 2).

On a data / FSDP mesh (expert axis 1) the dropless dispatch is local: every expert on every
device. Traced on the global token array, its grouped matmul is a Pallas custom call (our
Pallas-Triton kernel, JAX's megablox) that XLA cannot partition: it all-gathers the tokens and
the sort onto every device and computes the whole batch's MoE on each. (`ragged_dot` XLA
partitions; the plan leaves that path global.) Here the dispatch runs under `jax.shard_map`:

  tokens   x [M, D] and the routing [M, ...] split by rows over the mesh's batch axes
           (LOGICAL_RULES["batch"] of size > 1, as `sharding.batch_sharding` splits a batch):
           each device sorts, runs the grouped matmuls and combines its own m = M/P rows;
  weights  replicated inside (in_specs P()): XLA all-gathers FSDP-sharded expert weights before
           the call, as FSDP does for every layer anyway; their gradient is the psum of the
           devices' gradients (shard_map's transpose). A tensor axis > 1 gets the whole experts
           too: correct, not tensor-parallel (each of its devices computes the same rows).

Routing and the aux statistics (`model/moe.py`'s `routing_aux`) stay outside, on the global
arrays: the router matmul, softmax and top-k are per token, which XLA partitions by rows, and
the sums over tokens (tokens per expert, router probability, z-loss) become its all-reduces,
so the aux losses are the one-device values by construction. Nothing is dropped here.

Letters as in `ops.py`; P devices on the batch axes, m = M/P rows per device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.moe.ops import Routing
from mixtral_jax.parallel import sharding

TOKEN_AXES = sharding.LOGICAL_RULES["batch"]  # mesh axes that split the tokens
(EXPERT_AXIS,) = sharding.LOGICAL_RULES["experts"]


def token_axes(mesh: Mesh | None) -> tuple[str, ...]:
    """The batch axes of `mesh` of size > 1, where a local dropless dispatch runs per device;
    () without a mesh, or on one whose expert axis is > 1 (that is expert-parallel)."""
    if mesh is None or mesh.shape[EXPERT_AXIS] > 1:
        return ()
    return tuple(a for a in TOKEN_AXES if mesh.shape[a] > 1)


def moe_per_device(local_fn, x, routing: Routing, replicated: tuple, *, mesh: Mesh | None):
    """local_fn(x, routing, *replicated) on every device over its own token rows (mesh: the
    kernel plan's `token_mesh`), or on the global tokens where `mesh` is None.

    Args:
      local_fn: a local dropless dispatch, e.g. `moe_dropless` with its static options bound:
        ([m, D], Routing of [m, ...], *replicated) -> ([m, D] float32, dropped = 0).
      x: [M, D]; routing: a `Routing` of M tokens.
      replicated: whole on every device: expert weights [E, ...] or stacks [L, E, ...] (arrays
        or `QuantizedWeight`s), a layer index, adapter factors (any pytrees).
      mesh: None, or one with batch axes > 1 (`token_axes`) and an expert axis of 1.
    Returns:
      ([M, D] float32, dropped = 0).

    M not a multiple of P (decode) is padded with rows of router weight 0 (routed to expert 0,
    so their output is 0 and no gradient flows through them) and cut off again.
    """
    if mesh is None:
        return local_fn(x, routing, *replicated)
    axes = token_axes(mesh)
    if not axes:
        raise ValueError(f"mesh {dict(mesh.shape)} has no batch axis > 1 without an expert axis")
    parts = math.prod(mesh.shape[a] for a in axes)
    num_tokens = x.shape[0]
    pad = -num_tokens % parts
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        routing = jax.tree.map(lambda r: jnp.pad(r, ((0, pad), (0, 0))), routing)

    def local(x, routing, replicated):
        out, _ = local_fn(x, routing, *replicated)
        return out, jnp.zeros((), jnp.int32)

    tok = P(axes)
    run = jax.shard_map(
        local, mesh=mesh, in_specs=(tok, tok, P()), out_specs=(tok, P()), check_vma=False
    )
    out, dropped = run(x, routing, tuple(replicated))
    return out[:num_tokens], dropped
