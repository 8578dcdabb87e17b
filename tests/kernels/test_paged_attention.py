"""The paged decode-attention kernel (one query per row, following its block table through the
pool, read in place) in Pallas interpret mode against the gather + einsum oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import paged_attention
from mixtral_jax.model.attention import dot_product_attention
from mixtral_jax.model.paged_kv_cache import gather_rows, paged_attention_mask


@pytest.mark.parametrize(
    "entries,window,dtype,tol",
    [(5, None, jnp.float32, 1e-5), (4, 20, jnp.bfloat16, 2e-2)],
)
def test_kernel_equals_the_gathered_einsum_attention_of_the_chosen_layer(
    entries, window, dtype, tol
):
    b, n, kv, h, layers, z = 3, 8, 2, 16, 2, 16
    pool_blocks = b * entries + 2
    keys = jax.random.split(jax.random.key(entries), 3)
    q = jax.random.normal(keys[0], (b, n, h), dtype)
    k_pool = jax.random.normal(keys[1], (layers, pool_blocks, z, kv, h), dtype)
    v_pool = jax.random.normal(keys[2], (layers, pool_blocks, z, kv, h), dtype)
    order = np.random.default_rng(entries).permutation(np.arange(1, pool_blocks))
    table = order[: b * entries].reshape(b, entries).astype(np.int32)
    lengths = np.array([entries * z - 1, 17, 3], np.int32)  # the new token at index lengths[b]
    table[2, 1:] = 0  # a short row: unused entries point at the sink
    mask = paged_attention_mask(
        jnp.asarray(lengths), 1, jnp.ones((b, 1), bool), entries * z, window
    )[:, 0]
    run = jax.jit(
        lambda q, k, v, i: paged_attention.paged_decode_attention(
            q, k, v, i, jnp.asarray(table), mask, interpret=True
        )
    )
    for layer in (0, 1):
        got = run(q, k_pool, v_pool, layer)
        rows_k = gather_rows(k_pool, jnp.int32(layer), jnp.asarray(table))
        rows_v = gather_rows(v_pool, jnp.int32(layer), jnp.asarray(table))
        want = dot_product_attention(q[:, None], rows_k, rows_v, mask[:, None])[:, 0]
        assert got.shape == (b, n, h) and got.dtype == dtype
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err <= tol * float(jnp.max(jnp.abs(want.astype(jnp.float32)))), err


def test_splits_fill_the_programs_and_blocks_must_tile():
    assert paged_attention._splits(40, 8) == (20, 2)  # batch 1, 8 kv heads: 160 programs
    assert paged_attention._splits(40, 256 * 8) == (1, 40)
    assert paged_attention._splits(7, 64) == (4, 2)  # a ragged last split
    pool = jnp.zeros((1, 3, 8, 2, 16))
    with pytest.raises(ValueError, match="block_size=8 must be a multiple of 16"):
        paged_attention.paged_decode_attention(
            jnp.zeros((1, 4, 16)), pool, pool, 0, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 16))
        )
