"""The split form of a prefill chunk's attention (model/chunk_attention.py: prefix keys unmasked +
the chunk's own keys causal, merged by log-sum-exp) against the masked einsum oracle
(attention.dot_product_attention with cached_attention_mask). On CPU the parts run as einsums;
bench/split_attention.py runs the cuDNN parts on the GPU."""

import enum

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.config import AttentionImpl
from mixtral_jax.kernels import cudnn_attention
from mixtral_jax.model import chunk_attention
from mixtral_jax.model.attention import cached_attention_mask, dot_product_attention, write_cache
from mixtral_jax.model.kv_cache import KVCache

# compiled once per shape: op-by-op dispatch of these small programs is most of a test's time
_layout = jax.jit(chunk_attention.chunk_layout, static_argnums=(1,))
_split = jax.jit(chunk_attention.split_attention, static_argnums=(6,))
_oracle = jax.jit(dot_product_attention)


def _chunk_problem(seed, size, prefix, t, pads, n=4, kv=2, h=8):
    """A cache of `size` slots holding `prefix` tokens, then a chunk of t written at
    [prefix, prefix + t); row b's first pads[b] tokens are padding. Returns q, the layer's
    cache after the write, the chunk's k and v, index, valid [B, S] and the real queries [B, T]."""
    b = len(pads)
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k_cache = jax.random.normal(keys[1], (1, b, size, kv, h))  # stale values in every slot
    v_cache = jax.random.normal(keys[2], (1, b, size, kv, h))
    k_new = jax.random.normal(keys[3], (b, t, kv, h))
    v_new = jax.random.normal(keys[4], (b, t, kv, h))
    slots = jnp.arange(prefix, prefix + t)
    layer = jnp.zeros((), jnp.int32)
    k_cache = write_cache(k_cache, k_new, layer, slots)[0]
    v_cache = write_cache(v_cache, v_new, layer, slots)[0]
    end = prefix + t
    index = np.where(np.arange(size) < end, np.arange(size), -1)
    valid = (index >= 0)[None] & (np.arange(size)[None] >= np.asarray(pads)[:, None])
    real = valid[:, prefix:end]
    return q, k_cache, v_cache, k_new, v_new, jnp.asarray(index), jnp.asarray(valid), real


@pytest.mark.parametrize(
    "size,prefix,t,pads",
    [
        (24, 0, 8, (0,)),  # the first chunk: no prefix key at all
        (24, 0, 8, (0, 3, 8)),  # padding inside the first chunk; row 2 all padding
        (24, 16, 8, (0,)),  # the chunk fills the cache
        (37, 13, 6, (0, 5, 13, 15)),  # T not dividing S; padding in the prefix, and past it
        (40, 12, 12, (4, 0, 11)),  # T == P
    ],
)
def test_split_equals_the_masked_oracle(size, prefix, t, pads):
    q, k_cache, v_cache, k_new, v_new, index, valid, real = _chunk_problem(
        size + prefix, size, prefix, t, pads
    )
    layout = _layout(jnp.int32(prefix), t, index, valid)
    assert bool(layout.exact)
    np.testing.assert_array_equal(np.asarray(layout.first), [min(p, prefix + t) for p in pads])
    mask = cached_attention_mask(jnp.arange(prefix, prefix + t), index, valid, None)
    want = _oracle(q, k_cache, v_cache, mask)
    got = _split(q, k_cache, v_cache, k_new, v_new, layout, AttentionImpl.XLA)
    assert np.isfinite(np.asarray(got)).all()  # padding queries too
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)


def test_split_under_jit_with_a_traced_prefix():
    """One compiled split for every P (P traced, as in the layer scan)."""
    size, t = 30, 5
    split = jax.jit(
        lambda *a: chunk_attention.split_attention(*a, AttentionImpl.XLA), static_argnums=()
    )
    for prefix in (0, 7, 25):
        q, k_cache, v_cache, k_new, v_new, index, valid, real = _chunk_problem(
            prefix, size, prefix, t, (0, 2)
        )
        layout = chunk_attention.chunk_layout(jnp.int32(prefix), t, index, valid)
        mask = cached_attention_mask(jnp.arange(prefix, prefix + t), index, valid, None)
        want = dot_product_attention(q, k_cache, v_cache, mask)
        got = split(q, k_cache, v_cache, k_new, v_new, layout)
        np.testing.assert_allclose(
            np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5
        )
    assert split._cache_size() == 1


def test_layout_is_not_exact_for_a_hole_a_wrap_or_a_stale_slot():
    size, prefix, t = 24, 8, 8
    _, _, _, _, _, index, valid, _ = _chunk_problem(0, size, prefix, t, (0, 2))
    exact = chunk_attention.chunk_layout(jnp.int32(prefix), t, index, valid).exact
    assert bool(exact)
    hole = valid.at[1, 5].set(False)  # padding after a real token (not left padding)
    assert not bool(chunk_attention.chunk_layout(jnp.int32(prefix), t, index, hole).exact)
    late = valid.at[0, prefix + t].set(True)  # a real token past the chunk
    assert not bool(chunk_attention.chunk_layout(jnp.int32(prefix), t, index, late).exact)
    moved = index.at[3].set(27)  # a slot holding another index (a wrapped buffer)
    assert not bool(chunk_attention.chunk_layout(jnp.int32(prefix), t, moved, valid).exact)
    # the chunk would run past the buffer
    assert not bool(chunk_attention.chunk_layout(jnp.int32(size - 4), t, index, valid).exact)


def test_combine_ignores_an_empty_part_even_when_it_is_nan():
    """A row with no prefix key: part a may be anything (cuDNN over zero keys), NaN included."""
    o_b = jnp.ones((2, 3, 4, 8))
    l_b = jnp.zeros((2, 3, 4))
    o_a = jnp.full((2, 3, 4, 8), jnp.nan)
    l_a = jnp.full((2, 3, 4), jnp.nan)
    out = chunk_attention.combine(o_a, l_a, o_b, l_b, jnp.array([False, False]))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(o_b))
    # equal log-sum-exps weigh the parts equally
    out = chunk_attention.combine(2 * o_b, l_b, o_b, l_b, jnp.array([True, True]))
    np.testing.assert_allclose(np.asarray(out), 1.5)


def _chunked_prefill(cfg, tokens, valid, chunk, size):
    """Logits [B, W, V] of a prefill of tokens, valid [B, W] in chunks of `chunk` through
    Mixtral.extend (one compiled chunk call)."""
    model = mj.init(cfg, 3)
    graphdef, state = nnx.split(model)
    extend = jax.jit(
        lambda s, t, c, p, v: nnx.merge(graphdef, s).extend(t, c, positions=p, valid=v)
    )
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    cache, logits = KVCache.create(cfg, tokens.shape[0], size), []
    for start in range(0, tokens.shape[1], chunk):
        piece = slice(start, start + chunk)
        out, cache = extend(state, tokens[:, piece], cache, positions[:, piece], valid[:, piece])
        logits.append(out.logits)
    return np.asarray(jnp.concatenate(logits, axis=1))


@pytest.mark.parametrize("hole", [False, True], ids=["left-padding", "padding-after-a-token"])
def test_extend_splits_where_the_cache_allows_and_masks_elsewhere(monkeypatch, hole):
    """Chunks of 8 over a 40-slot cache, row 1 left-padded by 11 (into the second chunk): the
    split (einsum parts on CPU) equals the masked call. A split that returned zeros changes the
    logits with left padding (so the split ran) and not with padding after a real token (the
    layout is not exact there: the masked call ran)."""
    cfg = mj.ModelConfig.tiny()
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 24)))
    valid = jnp.ones((2, 24), bool).at[1, :11].set(False)
    if hole:
        valid = valid.at[0, 3].set(False)  # every chunk sees it
    real = np.asarray(valid)
    masked = _chunked_prefill(cfg.replace(chunk_attention_impl="masked"), tokens, valid, 8, 40)
    split = _chunked_prefill(cfg.replace(chunk_attention_impl="split"), tokens, valid, 8, 40)
    scale = np.abs(masked[real]).max()
    assert np.abs(split[real] - masked[real]).max() / scale <= 1e-5
    monkeypatch.setattr(chunk_attention, "split_attention", lambda q, *args: jnp.zeros_like(q))
    zeroed = _chunked_prefill(cfg.replace(chunk_attention_impl="split"), tokens, valid, 8, 40)
    changed = np.abs(zeroed[real] - masked[real]).max() / scale > 1e-2
    assert changed != hole


class _EinsumCudnn:
    """A stand-in for jax._src.cudnn.fused_attention_stablehlo with cuDNN's documented contract
    (scale applied in the kernel; PADDING hides keys at and past kv_seqlen; CAUSAL top-left;
    the log-sum-exp laid out [B, N, T]), so the CPU runs `attention_with_lse`'s own argument
    and layout handling."""

    class MaskType(enum.Enum):
        NO_MASK = 0
        PADDING = 1
        CAUSAL = 2

    @classmethod
    def dot_product_attention(
        cls,
        q,
        k,
        v,
        q_seqlen=None,
        kv_seqlen=None,
        *,
        scale,
        mask_type,
        qkv_layout,
        return_residual,
    ):
        assert qkv_layout == "BTNH" and return_residual and q.dtype == k.dtype == v.dtype
        b, t, n, h = q.shape
        s, kv = k.shape[1], k.shape[2]
        allowed = jnp.ones((b, t, s), bool)
        if mask_type == cls.MaskType.PADDING:
            allowed &= jnp.arange(s)[None, None] < kv_seqlen[:, None, None]
        if mask_type == cls.MaskType.CAUSAL:
            allowed &= jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
        qg = q.reshape(b, t, kv, n // kv, h)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k) * scale
        logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, K, G, T]
        out = jnp.einsum("BKGTS,BSKH->BTKGH", jnp.exp(logits - lse[..., None]), v)
        return out.reshape(b, t, n, h), lse.reshape(b, n, t)


def test_the_cudnn_parts_call_form_against_an_einsum_stand_in(monkeypatch):
    """split_attention with cudnn parts, cuDNN replaced by `_EinsumCudnn`: the call form
    (scale, masks, kv lengths clamped to >= 1 for a row with no prefix key, the [B, N, T]
    log-sum-exp turned [B, T, N]) equals the masked oracle."""
    monkeypatch.setattr(cudnn_attention, "_module", lambda: _EinsumCudnn)
    size, prefix, t, pads = 37, 13, 6, (0, 5, 15)
    q, k_cache, v_cache, k_new, v_new, index, valid, real = _chunk_problem(
        9, size, prefix, t, pads, n=4, kv=2
    )
    layout = chunk_attention.chunk_layout(jnp.int32(prefix), t, index, valid)
    mask = cached_attention_mask(jnp.arange(prefix, prefix + t), index, valid, None)
    want = dot_product_attention(q, k_cache, v_cache, mask)
    got = chunk_attention.split_attention(
        q, k_cache, v_cache, k_new, v_new, layout, AttentionImpl.CUDNN
    )
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)
