"""The fused-attention call form (attention.fused_attention: is_causal, local_window_size, mask,
GQA through jax.nn.dot_product_attention) against our einsum attention, and the kernel choice.
On CPU the call runs with implementation='xla'; bench/attention.py runs it with 'cudnn'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.config import AttentionImpl, ConfigError
from mixtral_jax.kernels.plan import resolve_attention
from mixtral_jax.model.attention import (
    cached_attention_mask,
    cached_flash_attention,
    dot_product_attention,
    fused_attention,
    make_attention_mask,
)


@pytest.mark.parametrize("window", [None, 1, 3])
def test_fused_call_equals_einsum_attention(window):
    b, t, n, kv, h = 2, 9, 4, 2, 8
    keys = jax.random.split(jax.random.key(window or 0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, t, kv, h))
    v = jax.random.normal(keys[2], (b, t, kv, h))
    padding = jnp.array([[1] * t, [0, 0] + [1] * (t - 2)])  # row 1 left-padded
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3], [0, 0, 1, 1, 1, 1, 2, 2, 2]])
    for extra in ({}, {"attention_mask": padding}, {"segment_ids": segments}):
        mask = make_attention_mask(t, t, sliding_window=window, **extra)
        want = dot_product_attention(q, k, v, mask)
        got = fused_attention(q, k, v, mask, window, implementation="xla")
        rows = np.asarray(mask.any(-1))  # rows with at least one visible key
        rows = np.broadcast_to(rows, (b, t))
        np.testing.assert_allclose(
            np.asarray(got)[rows], np.asarray(want)[rows], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "window,size,rolling",
    [(None, 40, False), (5, 40, False), (9, 12, True)],
    ids=["no-window", "window", "rolling-buffer"],
)
def test_cached_flash_call_equals_einsum_attention_for_a_chunk_at_the_end_of_a_cache(
    window, size, rolling
):
    """A chunk of T = 6 queries at absolute indices 20..25 after 20 cached tokens, over the
    cache's slots (a contiguous cache with empty slots at its end, or a rolling buffer of 12
    slots holding indices 14..25 at slot i % 12), row 1 left-padded by 4 tokens: the
    jax.nn.dot_product_attention call form (no is_causal: the mask alone) equals the einsum."""
    b, t, n, kv, h, done = 2, 6, 4, 2, 8, 20
    keys = jax.random.split(jax.random.key(size), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, size, kv, h))
    v = jax.random.normal(keys[2], (b, size, kv, h))
    written = np.arange(done + t)  # every absolute index written so far, the chunk's included
    slots = written % size if rolling else written
    index = np.full(size, -1)
    index[slots[-size:] if rolling else slots] = written[-size:] if rolling else written
    key_valid = (index >= 0)[None].repeat(b, 0)
    key_valid[1] &= index >= 4  # row 1's first 4 tokens are padding
    q_index = jnp.arange(done, done + t)
    mask = cached_attention_mask(q_index, jnp.asarray(index), jnp.asarray(key_valid), window)
    if not rolling:
        assert not mask[:, :, done + t :].any() and mask[:, 0, done].all()  # top-left != this
    want = dot_product_attention(q, k, v, mask)
    got = cached_flash_attention(q, k, v, mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # The filled prefix as a key limit (what Mixtral.extend passes: min(length + T, S)) skips
    # only masked keys; a limit one short of it would drop the chunk's last key.
    limit = min(done + t, size)
    got = cached_flash_attention(q, k, v, mask, implementation="xla", key_limit=limit)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    short = cached_flash_attention(q, k, v, mask, implementation="xla", key_limit=limit - 1)
    assert not np.allclose(np.asarray(short), np.asarray(want), atol=1e-3)


def test_choice_is_xla_on_cpu_and_cudnn_is_refused_with_the_reason():
    assert resolve_attention("auto", jnp.bfloat16, 128) == AttentionImpl.XLA
    assert resolve_attention("xla", jnp.float32, 256) == AttentionImpl.XLA
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
        resolve_attention("cudnn", jnp.bfloat16, 128)
