"""Primitives with hand-computable answers: RMSNorm, RoPE, masks, grouped-query attention."""

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.model.attention import dot_product_attention, make_attention_mask
from mixtral_jax.model.layers import RMSNorm, apply_rope, rope_cos_sin


def test_rmsnorm_of_constant_rows_is_the_scale_and_runs_in_float32():
    norm = RMSNorm(4, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
    norm.scale[...] = jnp.array([1.0, 2.0, 3.0, 4.0])
    out = norm(jnp.full((2, 4), 7.0))
    np.testing.assert_allclose(out, np.tile([1.0, 2.0, 3.0, 4.0], (2, 1)), rtol=1e-5)
    # bfloat16 input with huge values: the square is taken in float32, no overflow to inf.
    bf = RMSNorm(4, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    big = bf(jnp.full((1, 4), 3e38, jnp.float32).astype(jnp.bfloat16))
    assert big.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(big)))


def test_rope_is_identity_at_position_zero_and_preserves_norms():
    x = jax.random.normal(jax.random.key(0), (1, 5, 3, 8))
    cos, sin = rope_cos_sin(jnp.arange(5)[None], 8, 10000.0)
    rotated = apply_rope(x, cos, sin)
    np.testing.assert_allclose(rotated[:, 0], x[:, 0], rtol=1e-6)
    np.testing.assert_allclose(
        jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_rope_rotates_half_pairs_by_position_times_frequency():
    head_dim, theta, pos = 4, 100.0, 3
    x = jnp.array([[[[1.0, 2.0, 3.0, 4.0]]]])
    cos, sin = rope_cos_sin(jnp.array([[pos]]), head_dim, theta)
    out = np.asarray(apply_rope(x, cos, sin))[0, 0, 0]
    # rotate-half pairs dimension i with i + H/2; frequency of pair i is theta^(-2i/H).
    for i, (a, b) in enumerate([(1.0, 3.0), (2.0, 4.0)]):
        angle = pos * theta ** (-2 * i / head_dim)
        assert np.isclose(out[i], a * np.cos(angle) - b * np.sin(angle), rtol=1e-5)
        assert np.isclose(out[i + 2], b * np.cos(angle) + a * np.sin(angle), rtol=1e-5)


def test_relative_positions_only_matter():
    """q.k after RoPE depends on the position difference alone."""
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))

    def score(qpos, kpos):
        cq, sq = rope_cos_sin(jnp.array([[qpos]]), 16, 1e6)
        ck, sk = rope_cos_sin(jnp.array([[kpos]]), 16, 1e6)
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert np.isclose(score(7, 3), score(104, 100), rtol=1e-4)


def test_causal_sliding_padding_and_segment_masks():
    m = np.asarray(make_attention_mask(5, 5, sliding_window=None))[0]
    np.testing.assert_array_equal(m, np.tril(np.ones((5, 5), bool)))
    w = np.asarray(make_attention_mask(5, 5, sliding_window=2))[0]
    expected = np.tril(np.ones((5, 5), bool)) & ~np.tril(np.ones((5, 5), bool), -2)
    np.testing.assert_array_equal(w, expected)  # each query sees itself and one key back
    pad = np.asarray(
        make_attention_mask(4, 4, sliding_window=None, attention_mask=jnp.array([[0, 1, 1, 1]]))
    )[0]
    assert not pad[:, 0].any() and pad[3, 1:].all()
    seg = np.asarray(
        make_attention_mask(4, 4, sliding_window=None, segment_ids=jnp.array([[1, 1, 2, 2]]))
    )[0]
    np.testing.assert_array_equal(seg, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    tail = np.asarray(make_attention_mask(2, 5, sliding_window=3))[0]  # last 2 queries of 5
    np.testing.assert_array_equal(tail, [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
    b, t, n, kv, h = 2, 6, 6, 2, 8
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kv, h))
    v = jax.random.normal(keys[2], (b, t, kv, h))
    mask = make_attention_mask(t, t, sliding_window=None)
    grouped = dot_product_attention(q, k, v, mask)
    repeat = n // kv
    mha = dot_product_attention(
        q, jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2), mask
    )
    np.testing.assert_allclose(grouped, mha, rtol=1e-5, atol=1e-6)
    # Against a numpy loop over heads.
    qn, kn, vn = map(np.asarray, (q, k, v))
    for head in range(n):
        s = qn[:, :, head] @ kn[:, :, head // repeat].transpose(0, 2, 1) / np.sqrt(h)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(
            grouped[:, :, head], p @ vn[:, :, head // repeat], rtol=1e-5, atol=1e-6
        )
