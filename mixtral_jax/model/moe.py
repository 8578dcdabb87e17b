"""The sparse Mixture-of-Experts block: the steps wired together, the kernel plan obeyed.

  1. route:    router logits (float32) -> softmax over E -> top-k -> renormalise (`ops.py`).
  2. dispatch: each (token, choice) assignment to its expert and back, by the kernel plan:
                 on one device  dense / dropless / gathered / capacity (`local.py`), or the
                                decode kernels of a few-token call (`expert_decode`, and
                                `expert_decode_grouped` above 64 tokens);
                 on a mesh whose expert axis is > 1  all-to-all over it (`expert_parallel.py`);
                 on a mesh without one where the grouped matmul is a Pallas kernel (pallas,
                                megablox), steps 1-4 per device on its own tokens under
                                shard_map (`data_parallel.py`, the plan's token_mesh).
               All compute the same function (dropless ones exactly; capacity may drop).
  3. expert_ffn: SwiGLU, silu(x W_gate) * (x W_up) W_down.
  4. combine:  unsort and take the routing-weighted sum over the k choices (float32).
  5. aux:      router logits, tokens per expert, dropped fraction, load-balancing loss (Switch/HF),
               router z-loss (ST-MoE), all padding-aware through a token mask.

Quantized experts (`ModelConfig.expert_bits` 8 or 4): `w_gate`, `w_up`, `w_down` hold the
integer codes and `w_gate_scale`, `w_up_scale`, `w_down_scale` the scales (`model/quantized.py`,
`kernels/quant.py`). Where the plan's `quantized_experts` is pallas the decode expert kernels or
the grouped matmul read them as `QuantizedWeight` (stacks); a full forward's local dropless
dispatch hands them to the grouped matmul too, which dequantizes each matrix to the compute
dtype for its float kernel (gradient in the activations only, no dequantized copy kept for
the backward: QLoRA); otherwise one layer is dequantized to the compute dtype and dispatched
as float weights.

Letters: M tokens (B*T flattened), A = M*k assignments, E experts, k choices per token,
D embed width, F expert hidden width, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax.config import (
    DecodeExpertImpl,
    DecodeProjectionImpl,
    GmmImpl,
    ModelConfig,
    MoEImpl,
    QuantizedImpl,
)
from mixtral_jax.kernels import decode_matmul, expert_decode, expert_decode_grouped
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.plan import KernelPlan
from mixtral_jax.model import lora, quantized
from mixtral_jax.model.layers import normal_init
from mixtral_jax.moe import data_parallel
from mixtral_jax.moe import expert_parallel as moe_parallel
from mixtral_jax.moe.local import moe_capacity, moe_dense, moe_dropless, moe_gathered
from mixtral_jax.moe.ops import Routing, route, route_logits


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


def dispatch(
    cfg: ModelConfig, plan: KernelPlan, x, routing: Routing, weights, layer: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Runs the experts as `plan` says: ([M, D] float32 output, dropped assignments).

    With `layer`, `weights` are the stacks of all layers in the compute dtype, or QuantizedWeight
    stacks where the plan's quantized_experts is pallas (a cached call):
    the decode kernels and the single-device dropless path read them in place, every other path
    slices the layer out.
    """
    if plan.decode_experts == DecodeExpertImpl.PALLAS and layer is not None:
        route_args = (x, routing.experts, routing.weights, *weights, layer)
        if plan.decode_expert_rows:  # chunks of rows of one expert each (65+ tokens; int4 33+)
            rows = plan.decode_expert_rows
            out = expert_decode_grouped.decode_experts_grouped(*route_args, rows=rows)
        else:  # every slot computes all tokens
            out = expert_decode.decode_experts(*route_args)
        return out, jnp.zeros((), jnp.int32)
    local_dropless = plan.moe == MoEImpl.DROPLESS and plan.expert_mesh is None
    if layer is not None and local_dropless and plan.decode_experts == DecodeExpertImpl.OFF:
        return moe_dropless(x, routing, *weights, gmm_impl=plan.grouped_matmul, layer=layer)
    if layer is not None:
        weights = tuple(w[layer] for w in weights)
    if plan.moe == MoEImpl.DENSE:
        return moe_dense(x, routing, *weights)
    if plan.expert_mesh is not None:
        factor = None if plan.moe == MoEImpl.DROPLESS else cfg.compute.capacity_factor
        return moe_parallel.moe_expert_parallel(
            x,
            routing,
            *weights,
            mesh=plan.expert_mesh,
            capacity_factor=factor,
            exchange=plan.exchange,
            gmm_impl=plan.grouped_matmul,
        )
    if plan.moe == MoEImpl.CAPACITY:
        return moe_capacity(x, routing, *weights, capacity=cfg.capacity(x.shape[0]))
    if plan.decode_experts == DecodeExpertImpl.GATHER:
        return moe_gathered(x, routing, *weights)
    return moe_dropless(
        x, routing, *weights, gmm_impl=plan.grouped_matmul, fused_swiglu=plan.fused_swiglu
    )


def _gmm_reads(cfg: ModelConfig, plan: KernelPlan, layer) -> bool:
    """Quantized experts in a full forward's local dropless dispatch: the grouped matmul takes
    the QuantizedWeights as they are and dequantizes each one there (its gradient reaches the
    rows alone, and no copy is kept for the backward: `kernels/grouped_matmul.py`)."""
    local = plan.moe == MoEImpl.DROPLESS and plan.expert_mesh is None
    full = layer is None and plan.decode_experts == DecodeExpertImpl.OFF
    # under pallas a QuantizedWeight goes to the codes-reading kernel: only where the plan says
    float_kernel = plan.grouped_matmul != GmmImpl.PALLAS
    return cfg.expert_bits < 16 and local and full and float_kernel


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts.

    Weights: router [D, E], w_gate [E, D, F], w_up [E, D, F], w_down [E, F, D]; quantized
    (expert_bits 8 / 4): w_* hold codes ([E, D, F] int8 / [E, D/2, F] uint8, ...) and
    w_*_scale [E, D/G, F], [E, D/G, F], [E, F/G, D] the scales.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = normal_init(cfg.initializer_range)
        pdt = jnp.dtype(cfg.compute.param_dtype)
        d, f, e = cfg.embed_dim, cfg.hidden_dim, cfg.num_experts
        self.router = nnx.Param(init(rngs.params(), (d, e), pdt))
        for name, shape in zip(quantized.EXPERTS, ((e, d, f), (e, d, f), (e, f, d))):
            w = init(rngs.params(), shape, pdt)
            quantized.store(
                self, name, w, cfg.expert_bits, cfg.quant_group_size, cfg.quant_scale_dtype
            )
        self.cfg = cfg

    def _route_and_dispatch(self, x, weights, layer, plan: KernelPlan):
        """Steps 1-4 on x [M, D]: ([M, D] float32, dropped assignments, Routing).

        weights: w_gate, w_up, w_down as `dispatch` takes them (with `layer`, stacks)."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.compute.dtype)
        if layer is not None and plan.decode_projections == DecodeProjectionImpl.PALLAS:
            # Decode on a GPU: every layer's router [L, D, E'], E' >= E padded to the kernel's
            # tile (Mixtral.extend), read at `layer` in place. XLA turns the [1, D] x [D, 8]
            # product into a reduction down 4096 rows with 8 outputs: 11 us per layer on an H200.
            (logits,) = decode_matmul.project_stacked(
                x, (self.router[...].astype(dt),), layer, out_dtype=jnp.float32
            )
            routing = route_logits(logits[:, : cfg.num_experts], cfg.num_experts_per_tok)
        else:
            routing = route(x, self.router[...], cfg.num_experts_per_tok)
        routing = lora.add_to_router(self, x, routing, cfg.num_experts_per_tok)  # if adapted
        out, dropped = lora.expert_dispatch(  # dispatch(), or with the experts' adapters
            plan, x, routing, weights, layer, self, lambda *a: dispatch(cfg, plan, *a)
        )
        return out, dropped, routing

    def __call__(
        self,
        x: jax.Array,
        token_mask: jax.Array | None = None,
        noise_rng: jax.Array | None = None,
        layer: jax.Array | None = None,
        plan: KernelPlan | None = None,
    ) -> tuple[jax.Array, MoEAux]:
        """Routes and mixes experts.

        Args:
          x: [B, T, D] normalised activations.
          token_mask: [B, T], 1 for real tokens; padding is routed but left out of the statistics.
          noise_rng: PRNG key enabling router jitter (training); None for deterministic.
          layer: a cached call inside the layer scan: w_* (and, where the plan's decode
            projections run, the router) hold every layer's stack [L, ...] and this int32
            scalar picks one (the stacks are read in place, not sliced out; on the plan's
            `token_mesh` that layer is taken out first: every device gathers one layer).
          plan: the call's kernels (`kernel_plan.resolve`); default: resolved for this call.
        Returns:
          ([B, T, D] in the compute dtype, MoEAux).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.compute.dtype)
        b, t, d = x.shape
        if plan is None:
            plan = kernel_plan.resolve(cfg, b * t, cached=layer is not None)
        x = x.reshape(b * t, d).astype(dt)  # [M, D]
        jitter = cfg.compute.router_jitter_noise
        if noise_rng is not None and jitter > 0:
            x = x * jax.random.uniform(noise_rng, x.shape, dt, 1.0 - jitter, 1.0 + jitter)
        weights = tuple(quantized.read(self, n, cfg.expert_bits) for n in quantized.EXPERTS)
        if plan.quantized_experts != QuantizedImpl.PALLAS and not _gmm_reads(cfg, plan, layer):
            weights, layer = quantized.as_compute(weights, dt, layer)  # cast / dequantize
        if plan.token_mesh is None:
            out, dropped, routing = self._route_and_dispatch(x, weights, layer, plan)
        else:  # its Pallas grouped matmul per device (moe/data_parallel.py)
            if layer is not None:  # this layer's weights gathered, not every layer's stacks
                weights, layer = tuple(w[layer][None] for w in weights), jnp.zeros((), jnp.int32)
            out, dropped, routing = data_parallel.moe_per_device(
                lambda x, *w: self._route_and_dispatch(x, w[:-1], w[-1], plan),
                x,
                (*weights, layer),
                mesh=plan.token_mesh,
            )
        mask = jnp.ones((b * t,), jnp.float32) if token_mask is None else token_mask.reshape(-1)
        aux = routing_aux(routing, mask.astype(jnp.float32), dropped)
        return out.astype(dt).reshape(b, t, d), aux
