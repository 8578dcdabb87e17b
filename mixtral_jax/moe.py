"""The sparse Mixture-of-Experts block, as small named steps.

  1. route:    router logits (float32) -> softmax over E -> top-k -> renormalise (HF semantics;
               ties go to the lower expert index, as `jax.lax.top_k` orders them).
  2. dispatch: get each (token, choice) assignment to its expert. Three implementations of the
               same function, chosen by `ModelConfig.moe_impl`:
                 dense     every expert on every token, weighted by routing (the oracle);
                 dropless  stable sort by expert, `grouped_matmul` over ragged groups;
                 capacity  stable sort, gather into [E, C, D] slots, batched matmul; assignments
                           past an expert's C slots are dropped (earlier tokens win).
  3. expert_ffn: SwiGLU, silu(x W_gate) * (x W_up) W_down.
  4. combine:  unsort and take the routing-weighted sum over the k choices (float32).
  5. aux:      router logits, tokens per expert, dropped fraction, load-balancing loss (Switch/HF),
               router z-loss (ST-MoE), all padding-aware through a token mask.

Letters: M tokens (B*T flattened), A = M*k assignments, E experts, k choices per token,
C capacity slots per expert, D embed width, F expert hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax import decode_matmul, expert_decode
from mixtral_jax.config import GmmImpl, ModelConfig, MoEImpl
from mixtral_jax.grouped_matmul import grouped_matmul, grouped_matmul_stacked
from mixtral_jax.grouped_matmul import resolve as resolve_gmm
from mixtral_jax.layers import normal_init


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


@struct.dataclass
class MoEAux:
    """Per-layer statistics and losses (leading [L] axis once stacked by the layer scan).

    Attributes:
      router_logits: [M, E] float32.
      tokens_per_expert: [E] int32 assignments of real (unmasked) tokens to each expert.
      expert_fraction: [E] float32 tokens_per_expert / real tokens (sums to k).
      router_prob: [E] float32 mean router probability over real tokens.
      load_balance_loss: [] E * sum(expert_fraction * router_prob); k when perfectly balanced.
      router_z_loss: [] mean over real tokens of logsumexp(logits)^2.
      dropped_fraction: [] share of assignments dropped for lack of capacity (0 unless capacity).
    """

    router_logits: jax.Array
    tokens_per_expert: jax.Array
    expert_fraction: jax.Array
    router_prob: jax.Array
    load_balance_loss: jax.Array
    router_z_loss: jax.Array
    dropped_fraction: jax.Array


# ---- 1. route -----------------------------------------------------------------------------
def route(x: jax.Array, router: jax.Array, topk: int) -> Routing:
    """x: [M, D], router: [D, E] -> Routing. Logits, softmax and weights all in float32."""
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))  # [M, E]
    return route_logits(logits, topk)


def route_logits(logits: jax.Array, topk: int) -> Routing:
    """[M, E] float32 router logits -> Routing."""
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, topk)  # [M, k], ties -> lower index first
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return Routing(logits=logits, weights=weights, experts=experts.astype(jnp.int32))


# ---- 3. expert FFN (shared by all dispatch paths) -----------------------------------------
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


# ---- 2+4. dispatch, expert FFN, combine: three implementations -----------------------------
def moe_dense(x, routing, w_gate, w_up, w_down):
    """Oracle: every expert computes every token; unchosen experts get weight 0.

    x: [M, D]; w_gate, w_up: [E, D, F]; w_down: [E, F, D] -> ([M, D] float32, dropped=0).
    """
    num_experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(routing.experts, num_experts) * routing.weights[..., None],
                      axis=1)  # [M, E]
    h = swiglu(jnp.einsum("MD,EDF->EMF", x, w_gate), jnp.einsum("MD,EDF->EMF", x, w_up))
    y = jnp.einsum("EMF,EFD->EMD", h, w_down)  # [E, M, D]
    out = jnp.einsum("EMD,ME->MD", y.astype(jnp.float32), combine)
    return out, jnp.zeros((), jnp.int32)


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


def unsort_and_combine(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """y_sorted: [A, D] rows in sorted order -> [M, D] float32 weighted sum over the k choices."""
    num_tokens, topk = weights.shape
    inverse = jnp.argsort(order)  # sorted position of each assignment
    y = y_sorted[inverse].reshape(num_tokens, topk, -1)  # [M, k, D]
    return jnp.einsum("MkD,Mk->MD", y.astype(jnp.float32), weights)


def moe_dropless(x, routing, w_gate, w_up, w_down, gmm_impl: GmmImpl = GmmImpl.AUTO,
                 layer: jax.Array | None = None):
    """Sort by expert, one grouped matmul per projection (kernel: `gmm_impl`), none dropped.

    With `layer`, w_* are stacks [L, E, ...] used at that layer (`grouped_matmul_stacked`).
    """
    topk = routing.experts.shape[1]
    order, group_sizes = sort_by_expert(routing.experts, w_gate.shape[-3])
    x_sorted = x[order // topk]  # [A, D]
    if layer is None:
        def gmm(lhs, w):
            return grouped_matmul(lhs, w, group_sizes, gmm_impl)
    else:
        def gmm(lhs, w):
            return grouped_matmul_stacked(lhs, w, group_sizes, layer, gmm_impl)
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
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    # Dispatch: slot (e, c) takes sorted row group_start[e] + c, or a zero row if c is unused.
    x_sorted = jnp.concatenate([x[order // topk], jnp.zeros_like(x[:1])])  # [A + 1, D]
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


# ---- 5. aux -------------------------------------------------------------------------------
def routing_aux(routing: Routing, token_mask: jax.Array, dropped: jax.Array) -> MoEAux:
    """Statistics of one layer's routing over real tokens (token_mask: [M] float32, 1 = real)."""
    num_experts = routing.logits.shape[-1]
    num_real = jnp.maximum(jnp.sum(token_mask), 1.0)
    chosen = jnp.sum(jax.nn.one_hot(routing.experts, num_experts), axis=1)  # [M, E] 0/1
    counts = jnp.sum(chosen * token_mask[:, None], axis=0)  # [E]
    expert_fraction = counts / num_real
    probs = jax.nn.softmax(routing.logits, axis=-1)
    router_prob = jnp.sum(probs * token_mask[:, None], axis=0) / num_real
    z = jax.nn.logsumexp(routing.logits, axis=-1)  # [M]
    return MoEAux(
        router_logits=routing.logits,
        tokens_per_expert=counts.astype(jnp.int32),
        expert_fraction=expert_fraction,
        router_prob=router_prob,
        load_balance_loss=num_experts * jnp.sum(expert_fraction * router_prob),
        router_z_loss=jnp.sum(z * z * token_mask) / num_real,
        dropped_fraction=dropped.astype(jnp.float32) / routing.experts.size,
    )


def dispatch(cfg: ModelConfig, x, routing: Routing, weights,
             layer: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Runs the experts by `cfg.moe_impl`: ([M, D] float32 output, dropped assignments).

    With `layer`, `weights` are the stacks of all layers in the compute dtype (inference): the
    single-device dropless path reads them in place, every other path slices the layer out. On an
    NVIDIA GPU, up to `expert_decode.MAX_TOKENS` tokens (decode) take `expert_decode`: no sort,
    two kernels that stream only the chosen experts' weights.

    Inside `moe_parallel.expert_parallel(mesh)` the non-dense paths dispatch over the mesh's
    expert axis with all-to-all (dropless keeps every assignment; capacity uses its factor). On
    one device, where the grouped matmul is ragged_dot (which reads every expert), a single token
    takes `moe_gathered` instead (reads only its k experts). The Pallas grouped matmul visits only
    the experts that have tokens, and beats the gathers at every size (H200, one 8x7B layer,
    1 token: 0.24 ms vs 0.52; BENCHMARKS.md).
    """
    from mixtral_jax import moe_parallel  # here: moe_parallel imports this module

    mesh = moe_parallel.active_mesh()
    kernel = resolve_gmm(cfg.gmm_impl)
    gathered = (x.shape[0] == 1 and cfg.num_experts_per_tok < cfg.num_experts
                and kernel == GmmImpl.XLA)
    if layer is not None and cfg.moe_impl == MoEImpl.DROPLESS and mesh is None:
        if (kernel == GmmImpl.PALLAS and x.shape[0] <= expert_decode.MAX_TOKENS
                and expert_decode.supports(cfg.embed_dim, cfg.hidden_dim)):
            out = expert_decode.decode_experts(x, routing.experts, routing.weights, *weights,
                                               layer)
            return out, jnp.zeros((), jnp.int32)
        if not gathered:
            return moe_dropless(x, routing, *weights, gmm_impl=cfg.gmm_impl, layer=layer)
    if layer is not None:
        weights = tuple(w[layer] for w in weights)
    if cfg.moe_impl == MoEImpl.DENSE:
        return moe_dense(x, routing, *weights)
    if mesh is not None:
        factor = None if cfg.moe_impl == MoEImpl.DROPLESS else cfg.capacity_factor
        return moe_parallel.moe_expert_parallel(x, routing, *weights, mesh=mesh,
                                                capacity_factor=factor)
    if cfg.moe_impl == MoEImpl.CAPACITY:
        return moe_capacity(x, routing, *weights, capacity=cfg.capacity(x.shape[0]))
    if gathered:
        return moe_gathered(x, routing, *weights)
    return moe_dropless(x, routing, *weights, gmm_impl=cfg.gmm_impl)


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts.

    Weights: router [D, E], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = normal_init(cfg.initializer_range)
        pdt = jnp.dtype(cfg.param_dtype)
        d, f, e = cfg.embed_dim, cfg.hidden_dim, cfg.num_experts
        self.router = nnx.Param(init(rngs.params(), (d, e), pdt))
        self.w_gate = nnx.Param(init(rngs.params(), (e, d, f), pdt))
        self.w_up = nnx.Param(init(rngs.params(), (e, d, f), pdt))
        self.w_down = nnx.Param(init(rngs.params(), (e, f, d), pdt))
        self.cfg = cfg

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None,
                 noise_rng: jax.Array | None = None,
                 layer: jax.Array | None = None) -> tuple[jax.Array, MoEAux]:
        """Routes and mixes experts.

        Args:
          x: [B, T, D] normalised activations.
          token_mask: [B, T], 1 for real tokens; padding is routed but left out of the statistics.
          noise_rng: PRNG key enabling router jitter (training); None for deterministic.
          layer: inference inside a layer scan: w_* hold every layer's stack [L, E, ...] and
            this int32 scalar picks one (the stacks are read in place, not sliced out).
        Returns:
          ([B, T, D] in the compute dtype, MoEAux).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, t, d = x.shape
        x = x.reshape(b * t, d).astype(dt)  # [M, D]
        if noise_rng is not None and cfg.router_jitter_noise > 0:
            j = cfg.router_jitter_noise
            x = x * jax.random.uniform(noise_rng, x.shape, dt, 1.0 - j, 1.0 + j)
        if layer is not None and self.router.ndim == 3:
            # Decode on a GPU: every layer's router [L, D, E'], E' >= E padded to the kernel's
            # tile (Mixtral.extend), read at `layer` in place. XLA turns the [1, D] x [D, 8]
            # product into a reduction down 4096 rows with 8 outputs: 11 us per layer on an H200.
            (logits,) = decode_matmul.project_stacked(x, (self.router[...].astype(dt),), layer,
                                                      out_dtype=jnp.float32)
            routing = route_logits(logits[:, :cfg.num_experts], cfg.num_experts_per_tok)
        else:
            routing = route(x, self.router[...], cfg.num_experts_per_tok)
        weights = tuple(w[...] for w in (self.w_gate, self.w_up, self.w_down))
        if layer is not None and any(w.dtype != dt for w in weights):
            weights, layer = tuple(w[layer][None] for w in weights), 0  # cast one layer, not all
        weights = tuple(w.astype(dt) for w in weights)
        out, dropped = dispatch(cfg, x, routing, weights, layer)
        mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1)
        aux = routing_aux(routing, mask.astype(jnp.float32), dropped)
        return out.astype(dt).reshape(b, t, d), aux
