"""A prefill chunk's attention in two unmasked parts, combined by their log-sum-exp.

A chunk of T queries at absolute indices [P, P + T), over a cache that fills from slot 0 (index i
in slot i, nothing wrapped), sees exactly
  (a) the prefix keys, cache slots [0, P): every one, no causality to apply, and
  (b) the chunk's own T keys: query i sees keys j <= i, top-left causal,
so attention splits into two calls that need no mask: (a) with a key length per row (flash
attention skips the keys past it), (b) causal (it skips the blocks above the diagonal), where
one masked call over the cache must read a bias [B, 1, T, S] and cannot skip the triangle.
With l the log-sum-exp of each part's scaled logits and o its output,
  out = (o_a exp(l_a - m) + o_b exp(l_b - m)) / (exp(l_a - m) + exp(l_b - m)),  m = max(l_a, l_b);
a row with no prefix key (P == 0, or all padding) takes o_b alone.

Left padding (a batch of prompts right-aligned, `generate/sampler.py`) is handled exactly: where
row b's real tokens start at slot f_b (every slot in [f_b, P + T) real, none before), part (a)
reads slots [f_b, P) moved to the front (a gather of the layer's slots, in place of the copy the
masked call also makes) with key length P - f_b; where f_b > P (the padding reaches into the
chunk, so the row has no prefix key), part (b) runs on the chunk's q, k, v rotated left by
c = f_b - P per row: the padding keys land after every real query (the causal mask hides them)
and the outputs rotate back. Padding queries get finite values that nobody reads.

`chunk_layout` decides per call (traced) whether a cache is in this shape; `Attention.cached`
runs the masked form where it is not (`jax.lax.cond`). Parts: `xla` (einsums, float32 softmax:
any platform, what the CPU tests run against `attention.dot_product_attention`), `cudnn`
(`kernels/cudnn_attention.py`, NVIDIA GPUs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mixtral_jax.config import AttentionImpl
from mixtral_jax.kernels import cudnn_attention

_MASKED = float(jnp.finfo(jnp.float32).min)


@struct.dataclass
class ChunkLayout:
    """Where a chunk's keys lie in the cache (`chunk_layout`).

    Attributes:
      prefix: [] int32 P, the tokens before the chunk (cache slots [0, P)).
      first: [B] int32 f_b, row b's first real token's slot (P + T for a row of padding only).
      exact: [] bool the split equals the masked attention (the cache is in the shape above).
    """

    prefix: jax.Array
    first: jax.Array
    exact: jax.Array


def chunk_layout(
    length: jax.Array, queries: int, index: jax.Array, valid: jax.Array
) -> ChunkLayout:
    """The layout of a chunk of `queries` (T) new tokens after `length` (P) cached ones.

    Args:
      length: [] int32 P, the cache's length before the chunk.
      queries: T.
      index: [S] int32 absolute index in each slot after the chunk's write (-1: empty).
      valid: [B, S] bool real tokens per slot after the write.
    Returns:
      ChunkLayout; `exact` when P + T <= S, slot s holds index s below P + T and nothing past
      it, and each row's real slots below P + T are one run ending at P + T (left padding).
    """
    size = index.shape[0]
    end = length + queries
    slots = jnp.arange(size, dtype=jnp.int32)
    inside = slots < end  # [S]
    first = end - jnp.sum(valid & inside, axis=1, dtype=jnp.int32)  # [B]
    run = jnp.where(inside, valid == (slots >= first[:, None]), ~valid)  # [B, S]
    filled = jnp.where(inside, index == slots, index < 0)  # [S]
    exact = (end <= size) & jnp.all(filled) & jnp.all(run)
    return ChunkLayout(prefix=jnp.asarray(length, jnp.int32), first=first, exact=exact)


def split_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    layout: ChunkLayout,
    impl: AttentionImpl,
) -> jax.Array:
    """Chunk attention as (prefix keys, unmasked) + (the chunk's own keys, causal).

    Args:
      q: [B, T, N, H] the chunk's rotated queries.
      k_cache, v_cache: [B, S, K, H] the layer's cache (slots past the prefix are not read).
      k_new, v_new: [B, T, K, H] the chunk's own rotated keys and values.
      layout: from `chunk_layout`, with `exact` true (else the result is not the attention).
      impl: XLA or CUDNN, the kernel of both parts.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t = q.shape[:2]
    lengths = jnp.maximum(layout.prefix - layout.first, 0)  # [B] prefix keys per row
    has_prefix = lengths > 0
    # (a) slots [f_b, P) moved to the front: key j is slot f_b + j (j < lengths[b]).
    source = jnp.minimum(
        jnp.arange(k_cache.shape[1])[None] + layout.first[:, None], k_cache.shape[1] - 1
    )
    rows = jnp.arange(b)[:, None]
    k_prefix, v_prefix = k_cache[rows, source], v_cache[rows, source]  # [B, S, K, H]
    # (b) rotate left by the padding inside the chunk (0 unless the row has no prefix key).
    shift = jnp.clip(layout.first - layout.prefix, 0, t)  # [B]
    order = (jnp.arange(t)[None] + shift[:, None]) % t  # [B, T] rotated position -> position
    q_rot, k_rot, v_rot = (x[rows, order] for x in (q, k_new, v_new))
    if impl == AttentionImpl.CUDNN:
        part_a = cudnn_attention.attention_with_lse(
            q, k_prefix, v_prefix, kv_lengths=jnp.maximum(lengths, 1), causal=False
        )
        part_b = cudnn_attention.attention_with_lse(
            q_rot, k_rot, v_rot, kv_lengths=None, causal=True
        )
    else:
        part_a = prefix_attention_xla(q, k_prefix, v_prefix, lengths)
        part_b = causal_attention_xla(q_rot, k_rot, v_rot)
    back = (jnp.arange(t)[None] - shift[:, None]) % t  # [B, T] position -> rotated position
    o_b, l_b = (x[rows, back] for x in part_b)
    return combine(*part_a, o_b, l_b, has_prefix).astype(q.dtype)


def combine(
    o_a: jax.Array, l_a: jax.Array, o_b: jax.Array, l_b: jax.Array, has_a: jax.Array
) -> jax.Array:
    """Two attentions over disjoint key sets merged into the attention over their union.

    o_a, o_b: [B, T, N, H]; l_a, l_b: [B, T, N] their log-sum-exps; has_a: [B] bool, False
    where part a had no key (its o_a and l_a, whatever they hold, NaN included, are ignored).
    Returns [B, T, N, H] float32.
    """
    has_a = has_a[:, None, None]  # [B, 1, 1]
    m = jnp.where(has_a, jnp.maximum(l_a, l_b), l_b)
    w_a = jnp.where(has_a, jnp.exp(jnp.where(has_a, l_a, m) - m), 0.0)  # [B, T, N]
    w_b = jnp.exp(l_b - m)
    o_a = jnp.where(has_a[..., None], o_a.astype(jnp.float32), 0.0)
    total = o_a * w_a[..., None] + o_b.astype(jnp.float32) * w_b[..., None]
    return total / (w_a + w_b)[..., None]


def _attention_xla(q, k, v, allowed):
    """Grouped attention with its log-sum-exp, float32: q [B, T, N, H]; k, v [B, S, K, H];
    allowed [B or 1, T, S] -> (out [B, T, N, H] float32, lse [B, T, N] float32)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed[:, None, None], logits * (h**-0.5), _MASKED)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32))
    lse = jnp.transpose(lse, (0, 3, 1, 2))  # [B, T, K, G]
    return out.reshape(b, t, n, h), lse.reshape(b, t, n)


def prefix_attention_xla(q, k, v, lengths):
    """Part (a) by einsums: q [B, T, N, H] over keys [0, lengths[b]) of k, v [B, S, K, H] ->
    (out, lse) float32 (garbage, finite, for a row of length 0)."""
    allowed = jnp.arange(k.shape[1])[None, None] < lengths[:, None, None]  # [B, 1, S]
    return _attention_xla(q, k, v, jnp.broadcast_to(allowed, (q.shape[0], q.shape[1], k.shape[1])))


def causal_attention_xla(q, k, v):
    """Part (b) by einsums: q [B, T, N, H] over k, v [B, T, K, H], query i seeing keys j <= i
    -> (out, lse) float32."""
    t = q.shape[1]
    allowed = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, T]
    return _attention_xla(q, k, v, allowed[None])
