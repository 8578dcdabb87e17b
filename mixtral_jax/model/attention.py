"""Grouped-query self-attention with rotary embeddings and an optional sliding window.

Masks are built from token *indices* (causality, window), a padding mask and optional segment
ids (packed documents); positions only feed RoPE. This matches Hugging Face, whose causal mask
uses cache positions while `position_ids` drive the rotary tables.

Two kernels for the full-sequence forward, as the kernel plan says (`kernels/plan.py`, from
`ComputeConfig.attention_impl`):
  xla    `dot_product_attention` below: einsums and a float32 softmax; any platform; the oracle.
  cudnn  cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`): told
         the mask is causal (and windowed) so it skips the blocks above the diagonal and outside
         the window; the boolean mask still rides along for padding and packed documents.
The cached path (`Attention.cached`, inference) runs the plan's `cached_attention` (from
`ComputeConfig.cached_attention_impl`): the einsum for decode steps, cuDNN flash attention for a
prefill chunk over the cache (`cached_flash_attention`: the mask alone says which keys a query
sees, since cuDNN's `is_causal` is aligned top-left, wrong for queries at the end of a cache);
where the plan's `split_chunk_attention` is on, a prefill chunk over a cache filled from slot 0
runs instead as two unmasked calls merged by log-sum-exp (`chunk_attention.py`). Where
the plan's `decode_projections` is pallas (cached calls up to 512 tokens on an NVIDIA GPU), its
projections read the layer's weights in place from the stacks [L, ...] (`Mixtral.extend` passes
them) through one Pallas launch for q, k and v and one for the output. Where its `decode_attention` is pallas (one
new token per row), the attention reads this layer of the cache stack in place
(`kernels/decode_attention.py`: no slice or relayout copy of the layer's keys and values).

Quantized projections (`ModelConfig.attention_bits` 8 or 4) are stored as 2-D matrices,
contraction first (`kernels/quant.py`): q_proj [D, N*H], k_proj and v_proj [D, K*H], o_proj
[N*H, D] hold the codes and q_proj_scale ... o_proj_scale the scales (`model/quantized.py`).
They are dequantized one layer at a time to the compute dtype (inside `quantized.frozen_einsum`,
whose gradient reaches the activations, never the codes), or read as `QuantizedWeight` stacks
by the decode projection kernel where the plan's `quantized_projections` is pallas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import (
    AttentionImpl,
    DecodeAttentionImpl,
    DecodeProjectionImpl,
    ModelConfig,
)
from mixtral_jax.kernels import decode_attention as flash_decode
from mixtral_jax.kernels import decode_matmul
from mixtral_jax.kernels import paged_attention as paged_decode
from mixtral_jax.kernels.plan import KernelPlan
from mixtral_jax.model import chunk_attention, lora, quantized
from mixtral_jax.model.layers import apply_rope, normal_init
from mixtral_jax.model.paged_kv_cache import gather_rows, write_paged

_QKV = ("q_proj", "k_proj", "v_proj")
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite, so a fully masked row stays NaN-free


def make_attention_mask(
    num_queries: int,
    num_keys: int,
    *,
    sliding_window: int | None,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Which keys each query may attend to.

    Args:
      num_queries: T. Queries are the last T of the S keys (prefill and training: T == S).
      num_keys: S.
      sliding_window: W or None; query i sees key j iff i - W < j <= i.
      attention_mask: [B, S] 1 for real tokens, 0 for padding (keys only, as HF).
      segment_ids: [B, S] document ids of packed sequences; attention stays inside a document.
    Returns:
      [B or 1, T, S] bool.
    """
    q_index = jnp.arange(num_keys - num_queries, num_keys)[:, None]  # [T, 1]
    k_index = jnp.arange(num_keys)[None, :]  # [1, S]
    allowed = k_index <= q_index  # [T, S]
    if sliding_window is not None:
        allowed &= k_index > q_index - sliding_window
    allowed = allowed[None]  # [1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask.astype(bool)[:, None, :]
    if segment_ids is not None:
        q_seg = segment_ids[:, num_keys - num_queries :]  # [B, T]
        allowed = allowed & (q_seg[:, :, None] == segment_ids[:, None, :])
    return allowed


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention, grouped: each of K kv heads serves G query heads.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B or 1, T, S] bool.
    Returns:
      [B, T, N, H] in q's dtype. Logits and softmax in float32.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * (h**-0.5)
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    sliding_window: int | None,
    implementation: str = "cudnn",
) -> jax.Array:
    """`dot_product_attention` through `jax.nn.dot_product_attention`, for T == S (no cache).

    The mask must already contain causality (and the window): is_causal and local_window_size
    only let the kernel skip work; the result is that of `mask` alone.
    q: [B, T, N, H]; k, v: [B, T, K, H]; mask: [B or 1, T, T] bool -> [B, T, N, H].
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask[:, None],
        is_causal=True,
        local_window_size=window,
        implementation=implementation,
    )


def cached_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    implementation: str = "cudnn",
    key_limit: jax.Array | None = None,
) -> jax.Array:
    """`dot_product_attention` through `jax.nn.dot_product_attention`, for T new queries over
    S cache keys (a prefill chunk).

    No is_causal or local_window_size: cuDNN aligns is_causal top-left (query i sees keys <= i),
    wrong for a chunk at the end of a cache, and refuses a window without it; causality, window,
    empty slots and padding all come from `mask` (`cached_attention_mask`). `key_limit` [] int32,
    when given, promises that keys at and past it are all masked (the empty tail of a cache that
    fills from slot 0): the kernel skips them (about half the attention work of a long chunked
    prefill); the result is that of `mask` alone.
    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B or 1, T, S] bool -> [B, T, N, H].
    """
    lengths = None
    if key_limit is not None:
        lengths = jnp.broadcast_to(jnp.asarray(key_limit, jnp.int32), (q.shape[0],))
    return jax.nn.dot_product_attention(
        q,
        k.astype(q.dtype),
        v.astype(q.dtype),
        mask=mask[:, None],
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )


def attend_cached(q, k, v, mask, impl: AttentionImpl, key_limit=None) -> jax.Array:
    """The plan's cached attention: q [B, T, N, H]; k, v [B, S, K, H]; mask [B, T, S] ->
    [B, T, N, H]. `key_limit`: see `cached_flash_attention` (the einsum needs only the mask)."""
    if impl == AttentionImpl.CUDNN:
        return cached_flash_attention(q, k, v, mask, "cudnn", key_limit)
    return dot_product_attention(q, k, v, mask)


class Attention(nnx.Module):
    """Self-attention: project, rotate q and k, attend, project out.

    Weights: q_proj [D, N, H], k_proj [D, K, H], v_proj [D, K, H], o_proj [N, H, D]; quantized
    (attention_bits 8 / 4): 2-D codes and scales, see the module doc.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        init = normal_init(cfg.initializer_range)
        pdt = jnp.dtype(cfg.compute.param_dtype)
        self.bits = cfg.attention_bits
        self.shapes = {name: quantized.float_shape(cfg, name) for name in quantized.PROJECTIONS}
        for name, shape in self.shapes.items():
            w = init(rngs.params(), shape, pdt)
            if self.bits < 16:  # contraction first: [D, heads*H] or [N*H, D]
                w = quantized.to_matrix(name, w)
            quantized.store(self, name, w, self.bits, cfg.quant_group_size, cfg.quant_scale_dtype)
        self.dtype = jnp.dtype(cfg.compute.dtype)
        self.sliding_window = cfg.sliding_window

    def product(self, spec: str, x: jax.Array, name: str) -> jax.Array:
        """einsum(spec, x, W) of one layer's projection `name` in the compute dtype and its
        float shape ([D, N, H], ..., [N, H, D]); stored quantized, dequantized inside the
        product, which then has a gradient in x alone (`quantized.frozen_einsum`)."""
        w = quantized.read(self, name, self.bits)
        if self.bits < 16:
            return quantized.frozen_einsum(spec, x, w, self.shapes[name], self.dtype)
        return jnp.einsum(spec, x, w.astype(self.dtype))

    def stack(self, name: str) -> jax.Array | quantized.QuantizedWeight:
        """Every layer's projection `name` as a 2-D stack [L, K, N] (contraction first) for the
        decode projection kernel: the float stack reshaped, or the QuantizedWeight stack."""
        w = quantized.read(self, name, self.bits)
        if self.bits < 16:
            return w
        if name == "o_proj":
            return w.reshape(w.shape[0], -1, w.shape[-1])  # [L, N*H, D]
        return w.reshape(w.shape[0], w.shape[1], -1)  # [L, D, heads*H]

    def __call__(
        self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, plan: KernelPlan
    ) -> jax.Array:
        """x: [B, T, D]; cos, sin: [B, T, H]; mask: [B or 1, T, T] -> [B, T, D]."""
        q, k, v = self.project(x, cos, sin)
        if plan.attention == AttentionImpl.CUDNN:
            out = fused_attention(q, k, v, mask, self.sliding_window, "cudnn")
        else:
            out = dot_product_attention(q, k, v, mask)  # [B, T, N, H]
        return self.output(out)

    def project(self, x, cos, sin, layer=None, stacked=False):
        """x: [B, T, D] -> rotated q [B, T, N, H], rotated k and v [B, T, K, H].

        With `stacked`, the projections are stacks [L, D, N, H] read at `layer` in place by the
        decode kernel (the plan's `decode_projections`).
        """
        dt = self.dtype
        if stacked:
            b, t, d = x.shape
            stacks = [self.stack(name) for name in ("q_proj", "k_proj", "v_proj")]
            q, k, v = decode_matmul.project_stacked(x.reshape(b * t, d).astype(dt), stacks, layer)
            q = q.reshape(b, t, *self.shapes["q_proj"][1:])
            k = k.reshape(b, t, *self.shapes["k_proj"][1:])
            v = v.reshape(b, t, *self.shapes["v_proj"][1:])
        else:
            q = self.product("BTD,DNH->BTNH", x, "q_proj")
            k = self.product("BSD,DKH->BSKH", x, "k_proj")
            v = self.product("BSD,DKH->BSKH", x, "v_proj")
        q, k, v = (lora.add(self, n, x, y) for n, y in zip(_QKV, (q, k, v), strict=True))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, out: jax.Array, layer=None, stacked=False) -> jax.Array:
        """[B, T, N, H] -> [B, T, D]. With `stacked`, o_proj is a stack [L, N, H, D] read at
        `layer`."""
        if stacked:
            b, t = out.shape[:2]
            stack = self.stack("o_proj")
            (y,) = decode_matmul.project_stacked(out.reshape(b * t, -1), (stack,), layer)
            return lora.add(self, "o_proj", out, y.reshape(b, t, -1))
        y = self.product("BTNH,NHD->BTD", out, "o_proj")
        return lora.add(self, "o_proj", out, y)  # the adapter's term, if any

    def cached(
        self,
        x,
        cos,
        sin,
        k_cache,
        v_cache,
        mask,
        slots,
        layer,
        plan: KernelPlan,
        read_first=False,
        key_limit=None,
        chunk=None,
    ):
        """Writes T new tokens into one layer of the cache, then attends over it.

        The cache arrives as every layer's stack (the carry of `Mixtral.extend`'s layer scan).
        Only the new slots are written, in place, and the attention then reads this layer by a
        dynamic index into the updated stack. Writing first gives XLA the order: a read of the
        old cache that the write did not depend on would make it copy the whole stack.

        Args:
          x: [B, T, D]; cos, sin: [B, T, H].
          k_cache, v_cache: [L, B, S, K, H] every layer's cache before this layer's new tokens.
          mask: [B, T, S + T - T'] over (cache slots after the write, then the first T - T' new
            tokens, which did not fit), see `cached_attention_mask`.
          slots: [T'] cache slots that the last T' <= T new tokens are written to.
          layer: [] int32 this layer's index into the cache stacks (and into the projection
            weights where those are stacks, see `project`).
          plan: the call's kernels; `decode_projections` pallas: the projections are stacks.
          read_first: attend over the buffer before the write and all T new tokens (mask over
            S + T keys), then write: exact where a write could evict a key that an earlier new
            query sees (see `Mixtral.extend`); XLA copies the stack to keep the old one readable.
          key_limit: [] int32 or None: keys at and past it are empty (see `Mixtral.extend`).
          chunk: a `chunk_attention.ChunkLayout` or None: where the plan splits a chunk's
            attention (`split_chunk_attention`) and the call's keys are the cache's slots alone;
            the split runs where the layout is exact, the masked call elsewhere (a cond).
        Returns:
          ([B, T, D], k_cache, v_cache) with layer `layer`'s `slots` overwritten.
        """
        stacked = plan.decode_projections == DecodeProjectionImpl.PALLAS
        q, k, v = self.project(x, cos, sin, layer, stacked)
        dropped = k.shape[1] - slots.shape[0]  # T - T' new tokens that the buffer cannot hold

        def write(k_cache, v_cache):
            return (
                write_cache(k_cache, k[:, dropped:], layer, slots),
                write_cache(v_cache, v[:, dropped:], layer, slots),
            )

        # Keys: this layer's S slots, then the new tokens the buffer does not show: all T when
        # reading first, else the T - T' that did not fit (none for decode, T = T' = 1).
        beyond = k.shape[1] if read_first else dropped
        if not read_first:
            k_cache, v_cache = write(k_cache, v_cache)
        if plan.decode_attention == DecodeAttentionImpl.PALLAS and beyond == 0 and q.shape[1] == 1:
            # one token per row: flash decoding reads this layer of the cache where it lies
            att = flash_decode.decode_attention(q[:, 0], k_cache, v_cache, layer, mask[:, 0])
            return self.output(att[:, None], layer, stacked), k_cache, v_cache
        impl = plan.cached_attention

        def layer_cache():  # [B, S, K, H] this layer's keys and values (sliced in each branch)
            return (
                jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in (k_cache, v_cache)
            )

        def masked():
            k_layer, v_layer = layer_cache()
            keys = jnp.concatenate([k_layer.astype(k.dtype), k[:, :beyond]], axis=1)
            values = jnp.concatenate([v_layer.astype(v.dtype), v[:, :beyond]], axis=1)
            return attend_cached(q, keys, values, mask, impl, key_limit)

        def split():  # the chunk's own keys as the cache holds them (its dtype), not re-read
            k_own, v_own = (x.astype(k_cache.dtype).astype(x.dtype) for x in (k, v))
            return chunk_attention.split_attention(q, *layer_cache(), k_own, v_own, chunk, impl)

        out = masked() if chunk is None else jax.lax.cond(chunk.exact, split, masked)
        out = self.output(out, layer, stacked)
        if read_first:
            k_cache, v_cache = write(k_cache, v_cache)
        return out, k_cache, v_cache

    def paged(self, x, cos, sin, k_pool, v_pool, mask, blocks, offsets, block_table, layer, plan):
        """Writes T new tokens per row into one layer of a paged pool, then attends over each
        row's blocks (`model/paged_kv_cache.py`).

        Where the plan's `paged_attention` is pallas (one token per row), the kernel follows
        each row's block table through the pool in place; otherwise the gather oracle copies
        each row's blocks of this layer out ([B, S, K, H]) and the plan's cached attention runs
        over them (the plan's `decode_attention` kernel reads a contiguous cache: not here).

        Args:
          x: [B, T, D]; cos, sin: [B, T, H].
          k_pool, v_pool: [L, P, Z, K, H] every layer's pool (the layer scan's carry).
          mask: [B, T, S] from `paged_attention_mask`.
          blocks, offsets: [B, T] where each new token goes (`write_locations`).
          block_table: [B, R] each row's blocks; layer: [] int32.
          plan: the call's kernels (`decode_projections` pallas: the projections are stacks).
        Returns:
          ([B, T, D], k_pool, v_pool) with the new tokens written.
        """
        stacked = plan.decode_projections == DecodeProjectionImpl.PALLAS
        q, k, v = self.project(x, cos, sin, layer, stacked)
        k_pool = write_paged(k_pool, k, layer, blocks, offsets)
        v_pool = write_paged(v_pool, v, layer, blocks, offsets)
        if plan.paged_attention == DecodeAttentionImpl.PALLAS and q.shape[1] == 1:
            # one token per row: follow the block table through the pool where it lies
            att = paged_decode.paged_decode_attention(
                q[:, 0], k_pool, v_pool, layer, block_table, mask[:, 0]
            )
            return self.output(att[:, None], layer, stacked), k_pool, v_pool
        keys = gather_rows(k_pool, layer, block_table).astype(q.dtype)  # [B, S, K, H]
        values = gather_rows(v_pool, layer, block_table).astype(q.dtype)
        out = attend_cached(q, keys, values, mask, plan.cached_attention)
        return self.output(out, layer, stacked), k_pool, v_pool


def cached_attention_mask(
    q_index: jax.Array, key_index: jax.Array, key_valid: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Mask for queries at absolute indices `q_index` [T] over keys at `key_index` [S]
    (-1 = empty slot) with `key_valid` [B, S] (False for padding) -> [B, T, S] bool."""
    allowed = (key_index[None, :] <= q_index[:, None]) & (key_index[None, :] >= 0)  # [T, S]
    if sliding_window is not None:
        allowed &= key_index[None, :] > q_index[:, None] - sliding_window
    return allowed[None] & key_valid[:, None, :]


def write_cache(stack: jax.Array, new: jax.Array, layer: jax.Array, slots: jax.Array) -> jax.Array:
    """Writes new [B, T, K, H] into layer `layer` of stack [L, B, S, K, H] at slots [T].

    A scatter of T slots (a dynamic-update-slice when T == 1), in place on a loop carry; the
    slots are distinct and in bounds (`Mixtral.extend` takes them modulo S).
    """
    # A scalar and an array index around ':' put the indexed axes first (NumPy): [T, B, K, H].
    new_tbkh = jnp.swapaxes(new, 0, 1).astype(stack.dtype)
    return stack.at[layer, :, slots].set(new_tbkh, mode="promise_in_bounds")
