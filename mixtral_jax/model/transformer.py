"""The Mixtral decoder: embed -> L x (attention + sparse MoE) under one scan -> norm -> LM head.

Building, abstracting and filling a model from weights live in `params.py`; the KV cache pytree
in `kv_cache.py`.

Dimension letters, used in every shape comment and einsum of the package:

  B batch            T query length       S key length       D embed_dim
  F expert hidden    N query heads        K kv heads         G = N / K
  H head_dim         V vocab              L layers           E experts
  k experts per token (spelled `topk` in names)              M = B*T tokens

The L decoder blocks are one stacked module (every weight has a leading [L] axis, built with
`nnx.vmap`) applied with `jax.lax.scan`, so XLA compiles one layer, not L copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mixtral_jax.config import DecodeProjectionImpl, LayerLoop, ModelConfig, Remat
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.plan import KernelPlan
from mixtral_jax.model import paged_kv_cache
from mixtral_jax.model.attention import Attention, cached_attention_mask, make_attention_mask
from mixtral_jax.model.chunk_attention import ChunkLayout, chunk_layout
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.layers import Embed, RMSNorm, float32_logits, normal_init, rope_cos_sin
from mixtral_jax.model.moe import MoE, MoEAux
from mixtral_jax.model.paged_kv_cache import PagedGroup, PagedKVCache
from mixtral_jax.parallel import sharding
from mixtral_jax.parallel.sharding import SCALE_SUFFIX


@struct.dataclass
class ModelAux:
    """Router outputs of the whole model.

    Attributes:
      layers: MoEAux whose fields carry a leading [L] axis (router_logits: [L, B, T, E]).
      load_balance_loss: [] Hugging Face's `load_balancing_loss_func` over all layers: E times the
        dot product of the layer-averaged expert fractions and router probabilities.
      router_z_loss: [] mean over layers of each layer's router z-loss.
    """

    layers: MoEAux
    load_balance_loss: jax.Array
    router_z_loss: jax.Array


@struct.dataclass
class ModelOutput:
    """logits: [B, T, V] float32; aux: ModelAux."""

    logits: jax.Array
    aux: ModelAux


def _pin(x: jax.Array) -> jax.Array:
    """[B, T, D] activation constrained on the active mesh (sharding.constrain)."""
    return sharding.constrain(x, "batch", "length", "embed")


class DecoderBlock(nnx.Module):
    """x + Attention(RMSNorm(x)), then h + MoE(RMSNorm(h))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.compute.dtype), jnp.dtype(cfg.compute.param_dtype)
        self.attn_norm = RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.moe_norm = RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt)
        self.moe = MoE(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, token_mask, noise_rng, plan: KernelPlan):
        """x: [B, T, D] -> ([B, T, D], MoEAux). On the active mesh, the inputs and outputs of
        attention and MoE are pinned to the rules table (no-ops without one)."""
        h = x + _pin(self.attn(_pin(self.attn_norm(x)), cos, sin, mask, plan))
        moe_out, aux = self.moe(_pin(self.moe_norm(h)), token_mask, noise_rng, plan=plan)
        return h + _pin(moe_out), aux

    def cached(
        self,
        x,
        cos,
        sin,
        k_cache,
        v_cache,
        mask,
        slots,
        token_mask,
        layer,
        plan: KernelPlan,
        read_first=False,
        key_limit=None,
        chunk=None,
    ):
        """Like __call__ over new tokens, reading and writing layer `layer` of the cache.

        k_cache, v_cache: [L, B, S, K, H] every layer's cache (see `Attention.cached`); layer:
        [] int32. Returns ([B, T, D], aux, k_cache, v_cache). The weights named by the plan's
        `stacked_weights` are every layer's stacks, read at `layer`.
        """
        attn, k_cache, v_cache = self.attn.cached(
            self.attn_norm(x),
            cos,
            sin,
            k_cache,
            v_cache,
            mask,
            slots,
            layer=layer,
            plan=plan,
            read_first=read_first,
            key_limit=key_limit,
            chunk=chunk,
        )
        h = x + attn
        moe_out, aux = self.moe(self.moe_norm(h), token_mask, layer=layer, plan=plan)
        return h + moe_out, aux, k_cache, v_cache

    def paged(self, x, cos, sin, k_pool, v_pool, groups, token_mask, layer, plan):
        """Like `cached` over a paged pool, for rows of several shapes at once.

        x: [1, M, D] the call's tokens, group after group (cos, sin: [1, M, H]); groups: per
        group (rows, new tokens, where, mask, block_table, plan), see `Mixtral.extend_paged`.
        Attention runs per group (`Attention.paged`, the group's plan); the MoE runs over all
        M tokens at once, so each expert's weights are read once for every group.
        Returns ([1, M, D], aux, k_pool, v_pool).
        """
        normed, parts, start = self.attn_norm(x), [], 0
        for b, t, where, mask, table, group_plan in groups:
            span = slice(start, start + b * t)
            attn, k_pool, v_pool = self.attn.paged(
                normed[0, span].reshape(b, t, -1),  # [B_g, T_g, D]
                cos[0, span].reshape(b, t, -1),
                sin[0, span].reshape(b, t, -1),
                k_pool,
                v_pool,
                mask,
                *where,
                table,
                layer,
                group_plan,
            )
            parts.append(attn.reshape(1, b * t, -1))
            start += b * t
        h = x + jnp.concatenate(parts, axis=1)  # [1, M, D]
        moe_out, aux = self.moe(self.moe_norm(h), token_mask, layer=layer, plan=plan)
        return h + moe_out, aux, k_pool, v_pool


def _stacked_filter(plan: KernelPlan):
    """An nnx filter selecting the block weights that `plan` reads as whole stacks."""
    names = set(plan.stacked_weights)  # a quantized weight's scales W_scale go with W

    def selected(path, value) -> bool:
        return len(path) >= 2 and (path[-2], str(path[-1]).removesuffix(SCALE_SUFFIX)) in names

    return selected


def _pad_router_stack(stacks: nnx.State) -> None:
    """Widens the router stack [L, D, E] in `stacks` to a multiple of 16 columns (zeros), the
    decode projection kernel's smallest tile: once per call, 2 MB for 8x7B."""
    router = stacks["moe"]["router"]
    stacks["moe"]["router"] = router.replace(
        jnp.pad(router[...], ((0, 0), (0, 0), (0, -router.shape[-1] % 16)))
    )


def _unrolled(body, carry, xs, length: int):
    """`jax.lax.scan(body, carry, xs)` as `length` calls in sequence: layer i gets slice i of
    every leaf of xs (a static `lax.slice`, whose gradient is a pad that XLA fuses into the
    gradient's consumers), and the per-layer outputs are stacked as the scan stacks them."""
    outs = []
    for i in range(length):
        xs_i = jax.tree.map(lambda a, i=i: jax.lax.index_in_dim(a, i, keepdims=False), xs)
        carry, out = body(carry, xs_i)
        outs.append(out)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


_REMAT_POLICIES = {
    Remat.FULL: None,  # save nothing but the scan carry
    Remat.SAVE_DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Mixtral(nnx.Module):
    """The sparse-MoE causal language model.

    Weights: embed.embedding [V, D]; layers.* with a leading [L] axis; final_norm.scale [D];
    lm_head [D, V] (untied from the embedding, as in Mixtral).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.compute.dtype), jnp.dtype(cfg.compute.param_dtype)
        self.cfg = cfg
        self.embed = Embed(
            cfg.vocab_size,
            cfg.embed_dim,
            std=cfg.initializer_range,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(cfg, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt)
        self.lm_head = nnx.Param(
            normal_init(cfg.initializer_range)(rngs.params(), (cfg.embed_dim, cfg.vocab_size), pdt)
        )

    def __call__(
        self,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        noise_rng: jax.Array | None = None,
        plan: KernelPlan | None = None,
    ) -> ModelOutput:
        """Full-sequence forward pass.

        Args:
          tokens: [B, T] int token ids.
          attention_mask: [B, T], 1 for real tokens and 0 for padding (HF semantics: padded keys
            are hidden; padded positions still get logits, which callers ignore).
          positions: [B, T] RoPE positions; default 0..T-1 for every row.
          segment_ids: [B, T] document ids when several documents are packed in a row.
          noise_rng: PRNG key for router jitter (training only); None is deterministic.
          plan: the kernels of this call; default `kernel_plan.resolve` for B*T tokens on the
            active mesh (the one decision, passed to every layer).
        Returns:
          ModelOutput with logits [B, T, V] float32 and the router aux.
        """
        cfg = self.cfg
        b, t = tokens.shape
        if plan is None:
            plan = kernel_plan.resolve(cfg, b * t, cached=False)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = make_attention_mask(
            t,
            t,
            sliding_window=cfg.sliding_window,
            attention_mask=attention_mask,
            segment_ids=segment_ids,
        )
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # [B, T, H]
        token_mask = None if attention_mask is None else attention_mask.astype(jnp.float32)
        layer_rngs = None if noise_rng is None else jax.random.split(noise_rng, cfg.num_layers)

        graphdef, layer_state = nnx.split(self.layers)

        def body(x, xs):
            state, rng = xs
            layer = nnx.merge(graphdef, state)
            x, aux = layer(x, cos, sin, mask, token_mask, rng, plan)
            return sharding.constrain(x, "batch", "length", "embed"), aux

        remat = cfg.compute.remat
        if remat != Remat.NONE:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[remat], prevent_cse=False)
        # Activation shardings on the active mesh (sharding.active; no-ops without one).
        x = sharding.constrain(self.embed(tokens), "batch", "length", "embed")  # [B, T, D]
        if cfg.compute.layer_loop == LayerLoop.UNROLLED:
            x, layer_aux = _unrolled(body, x, (layer_state, layer_rngs), cfg.num_layers)
        else:
            x, layer_aux = jax.lax.scan(body, x, (layer_state, layer_rngs))
        x = self.final_norm(x)
        logits = float32_logits(x, self.lm_head[...].astype(x.dtype))  # [B, T, V]
        logits = sharding.constrain(logits, "batch", "length", "vocab")
        return ModelOutput(logits=logits, aux=_model_aux(layer_aux, b, t))

    def extend(
        self,
        tokens: jax.Array,
        cache: KVCache,
        *,
        positions: jax.Array,
        valid: jax.Array,
        plan: KernelPlan | None = None,
    ) -> tuple[ModelOutput, KVCache]:
        """Runs T new tokens on top of `cache` (prefill: T = prompt length; decode: T = 1).

        Args:
          tokens: [B, T] new token ids, at absolute indices cache.length ... + T - 1.
          cache: the KV cache so far.
          positions: [B, T] RoPE positions of the new tokens (per row: left padding shifts them).
          valid: [B, T] bool, False for padding tokens (never attended to).
          plan: the kernels of this call; default `kernel_plan.resolve` for B*T cached tokens.
        Returns:
          (ModelOutput for the new tokens, updated cache).

        Normally the new tokens are written before they attend (in place: see
        `Attention.cached`), so a query sees the buffer after the write plus the new tokens that
        did not fit. That equals the full forward unless several new tokens land on a rolling
        buffer (sliding window W) smaller than W + T - 1, where a write can evict a key that an
        earlier new query still sees; such calls attend over the buffer before the write and
        all T new tokens instead (XLA then copies each layer's cache once; prefill only).

        Where the plan's `split_chunk_attention` is on, a chunk whose keys are the buffer's
        slots alone attends in two unmasked parts (`chunk_attention.py`) when the cache is in
        that form (`_chunk_layout`): P = cache.length prefix slots, each row's left padding.
        """
        cfg = self.cfg
        b, t = tokens.shape
        if plan is None:
            plan = kernel_plan.resolve(cfg, b * t, cached=True, queries=t)
        size = cache.index.shape[0]
        q_index = cache.length + jnp.arange(t, dtype=jnp.int32)  # [T]
        kept = min(t, size)  # a rolling buffer keeps only the last S new tokens
        slots = q_index[t - kept :] % size  # [kept]
        index = cache.index.at[slots].set(q_index[t - kept :])  # [S] after the write
        slot_valid = cache.valid.at[:, slots].set(valid[:, t - kept :].astype(bool))  # [B, S]
        read_first = cfg.sliding_window is not None and t > 1 and size < cfg.sliding_window + t - 1
        if read_first:  # keys: the S slots before the write, then all T new tokens
            key_index = jnp.concatenate([cache.index, q_index])  # [S + T]
            key_valid = jnp.concatenate([cache.valid, valid.astype(bool)], axis=1)
        else:  # keys: the S slots after the write, then the t - kept that did not fit
            key_index = jnp.concatenate([index, q_index[: t - kept]])  # [S + T - kept]
            key_valid = jnp.concatenate([slot_valid, valid[:, : t - kept].astype(bool)], axis=1)
        mask = cached_attention_mask(q_index, key_index, key_valid, cfg.sliding_window)
        # Slots fill from 0 (index i lives in slot i % S), so after this write every key at and
        # past `key_limit` is empty: flash attention may skip them (not when new tokens that did
        # not fit, or the pre-write buffer, are appended as extra keys).
        key_limit = None if read_first or kept < t else jnp.minimum(cache.length + t, size)
        chunk = None
        if plan.split_chunk_attention and key_limit is not None:
            chunk = self._chunk_layout(cache, t, index, slot_valid)
        token_mask = valid.astype(jnp.float32)

        def layer_call(layer, x, cos, sin, k_cache, v_cache, layer_index):
            return layer.cached(
                x,
                cos,
                sin,
                k_cache,
                v_cache,
                mask,
                slots,
                token_mask,
                layer=layer_index,
                plan=plan,
                read_first=read_first,
                key_limit=key_limit,
                chunk=chunk,
            )

        logits, layer_aux, k, v = self._scan_cached(
            tokens, positions, cache.k, cache.v, layer_call, plan
        )
        new_cache = KVCache(k=k, v=v, index=index, valid=slot_valid, length=cache.length + t)
        return ModelOutput(logits=logits, aux=_model_aux(layer_aux, b, t)), new_cache

    def _chunk_layout(self, cache: KVCache, t: int, index, slot_valid) -> ChunkLayout | None:
        """Where the chunk's keys lie for the split form (`chunk_attention.py`), or None where
        a window could hide part of the prefix: W < S (with S <= W every query of a cache that
        has not wrapped is at an index below W, so the window hides no key). Whether the cache
        is in the split's shape (filled from slot 0, left padding only, room for the chunk) is
        decided at run time (`ChunkLayout.exact`)."""
        window = self.cfg.sliding_window
        if window is not None and window < cache.index.shape[0]:
            return None
        return chunk_layout(cache.length, t, index, slot_valid)

    def extend_paged(
        self,
        tokens: jax.Array,
        cache: PagedKVCache,
        *,
        valid: jax.Array,
        plan: KernelPlan | None = None,
    ) -> tuple[ModelOutput, PagedKVCache]:
        """`extend` over a paged cache: T new tokens per row, each row at its own length.

        Args:
          tokens: [B, T] new token ids; row b's token t is at absolute index (and RoPE
            position) cache.lengths[b] + t.
          cache: the pool, each row's block table (blocks for every new valid token already
            assigned) and lengths.
          valid: [B, T] bool, True for a prefix of each row (a partial prefill chunk, or a row
            with nothing to run this step): only those are written, attended to and counted.
          plan: the kernels of this call; default `kernel_plan.resolve` for B*T cached tokens.
        Returns:
          (ModelOutput for the new tokens, the cache with the new tokens written and lengths
          advanced by each row's valid count).
        """
        group = PagedGroup(tokens, cache.block_table, cache.lengths, valid)
        (out,), (k, v), (lengths,) = self.extend_paged_groups((group,), cache.k, cache.v, plan=plan)
        return out, cache.replace(k=k, v=v, lengths=lengths)

    def extend_paged_groups(
        self,
        groups: tuple[PagedGroup, ...],
        k_pool: jax.Array,
        v_pool: jax.Array,
        *,
        plan: KernelPlan | None = None,
    ) -> tuple[tuple[ModelOutput, ...], tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
        """`extend_paged` for groups of rows of different shapes in one call over one pool (a
        decode step [B, 1] and a prefill chunk [Q, C]): each group attends by its own plan
        (`kernel_plan.for_queries`), and everything else runs over all their tokens at once,
        so one call reads the weights once for all of them.

        Args:
          groups: rows whose table entries point into the same pool (distinct new slots).
          k_pool, v_pool: [L, P, Z, K, H].
          plan: the kernels of the whole call; default resolved for all groups' tokens.
        Returns:
          (ModelOutput per group: logits [B_g, T_g, V], aux with router_logits [L, B_g, T_g, E]
          and the statistics of all groups' tokens; (k_pool, v_pool); new lengths per group).
        """
        cfg = self.cfg
        sizes = [g.tokens.size for g in groups]
        widest = max(g.tokens.shape[1] for g in groups)
        if plan is None:
            plan = kernel_plan.resolve(cfg, sum(sizes), cached=True, queries=widest)
        metas, positions = [], []
        for g in groups:
            b, t = g.tokens.shape
            view = PagedKVCache(k=k_pool, v=v_pool, block_table=g.block_table, lengths=g.lengths)
            valid = g.valid.astype(bool)
            where = paged_kv_cache.write_locations(view, t, valid)
            mask = paged_kv_cache.paged_attention_mask(
                g.lengths, t, valid, view.row_capacity, cfg.sliding_window
            )
            group_plan = plan if len(groups) == 1 else kernel_plan.for_queries(plan, cfg, t)
            metas.append((b, t, where, mask, g.block_table, group_plan))
            positions.append(g.lengths[:, None] + jnp.arange(t, dtype=jnp.int32))  # [B_g, T_g]
        token_mask = _flat([g.valid for g in groups]).astype(jnp.float32)  # [1, M]

        def layer_call(layer, x, cos, sin, k_pool, v_pool, layer_index):
            return layer.paged(x, cos, sin, k_pool, v_pool, metas, token_mask, layer_index, plan)

        logits, layer_aux, k, v = self._scan_cached(
            _flat([g.tokens for g in groups]), _flat(positions), k_pool, v_pool, layer_call, plan
        )
        aux = _model_aux(layer_aux, 1, sum(sizes))
        outs, start = [], 0
        for g, size in zip(groups, sizes):
            b, t = g.tokens.shape
            router = aux.layers.router_logits[:, 0, start : start + size]  # [L, B_g*T_g, E]
            layers = aux.layers.replace(router_logits=router.reshape(cfg.num_layers, b, t, -1))
            outs.append(
                ModelOutput(
                    logits=logits[0, start : start + size].reshape(b, t, -1),
                    aux=aux.replace(layers=layers),
                )
            )
            start += size
        lengths = tuple(g.lengths + jnp.sum(g.valid, axis=1, dtype=jnp.int32) for g in groups)
        return tuple(outs), (k, v), lengths

    def _scan_cached(self, tokens, positions, k_cache, v_cache, layer_call, plan: KernelPlan):
        """The layer scan of a cached call: embed, L x layer_call over the cache, norm, LM head.

        layer_call(layer, x, cos, sin, k_cache, v_cache, index) -> (x, aux, k_cache, v_cache)
        runs one block over every layer's cache stacks (contiguous [L, B, S, K, H] or a paged
        pool [L, P, Z, K, H]). Returns (logits [B, T, V] float32, stacked MoEAux, k, v).
        """
        cfg = self.cfg
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        # The plan's stacked weights stay out of the scan's sliced inputs: the layer reads layer
        # i of the whole stack in place (a scan slice feeding a custom kernel would be copied;
        # XLA copies a sliced layer before its matmul reads it).
        graphdef, expert_stacks, layer_state = nnx.split(self.layers, _stacked_filter(plan), ...)
        if plan.decode_projections == DecodeProjectionImpl.PALLAS:
            _pad_router_stack(expert_stacks)

        # The whole cache rides in the scan's carry: layer i reads its slice and writes only
        # its new slots, which XLA does in place (and in the caller's buffers when they are
        # donated). As scanned inputs and stacked outputs instead, every call would read the
        # whole cache and write a fresh copy of it.
        def body(carry, xs):
            x, k_cache, v_cache = carry
            state, index = xs
            layer = nnx.merge(graphdef, expert_stacks, state)
            x, aux, k_cache, v_cache = layer_call(layer, x, cos, sin, k_cache, v_cache, index)
            return (x, k_cache, v_cache), aux

        x = self.embed(tokens)
        indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, k, v), layer_aux = jax.lax.scan(
            body, (x, k_cache, v_cache), (layer_state, indices), unroll=plan.extend_unroll
        )
        x = self.final_norm(x)
        logits = float32_logits(x, self.lm_head[...].astype(x.dtype))  # [B, T, V]
        return logits, layer_aux, k, v


def _flat(arrays: list[jax.Array]) -> jax.Array:
    """[B_g, T_g] arrays, group after group -> [1, sum of B_g * T_g]."""
    return jnp.concatenate([a.reshape(1, -1) for a in arrays], axis=1)


def _model_aux(layer_aux: MoEAux, batch: int, length: int) -> ModelAux:
    num_layers, _, num_experts = layer_aux.router_logits.shape
    layers = layer_aux.replace(
        router_logits=layer_aux.router_logits.reshape(num_layers, batch, length, num_experts)
    )
    fraction = jnp.mean(layers.expert_fraction, axis=0)  # [E], every layer sees the same tokens
    prob = jnp.mean(layers.router_prob, axis=0)  # [E]
    return ModelAux(
        layers=layers,
        load_balance_loss=num_experts * jnp.sum(fraction * prob),
        router_z_loss=jnp.mean(layers.router_z_loss),
    )
