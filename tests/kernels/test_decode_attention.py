"""The decode-attention kernel (one query per row over layer l of the cache stack, read in
place) in Pallas interpret mode against the einsum attention (the oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import decode_attention
from mixtral_jax.model.attention import dot_product_attention


@pytest.mark.parametrize(
    "size,dtype,tol",
    [
        (144, jnp.float32, 1e-5),
        (1024, jnp.float32, 1e-5),
        (272, jnp.bfloat16, 2e-2),
        (128 * 67, jnp.float32, 1e-5),  # 67 blocks in 34 splits of 2: a ragged last split
    ],
)
def test_kernel_equals_the_einsum_attention_of_the_chosen_layer(size, dtype, tol):
    b, n, kv, h, layers = 2, 8, 2, 16, 3
    keys = jax.random.split(jax.random.key(size), 3)
    q = jax.random.normal(keys[0], (b, n, h), dtype)
    k_cache = jax.random.normal(keys[1], (layers, b, size, kv, h), dtype)
    v_cache = jax.random.normal(keys[2], (layers, b, size, kv, h), dtype)
    filled = size - 9  # an empty tail, row 1 left-padded by 5: both masked
    mask = np.zeros((b, size), bool)
    mask[:, :filled] = True
    mask[1, :5] = False
    run = jax.jit(
        lambda q, k, v, i: decode_attention.decode_attention(
            q, k, v, i, jnp.asarray(mask), interpret=True
        )
    )
    for layer in (0, 2):
        got = run(q, k_cache, v_cache, layer)
        want = dot_product_attention(
            q[:, None], k_cache[layer], v_cache[layer], jnp.asarray(mask)[:, None]
        )[:, 0]
        assert got.shape == (b, n, h) and got.dtype == dtype
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        assert err <= tol * float(jnp.max(jnp.abs(want.astype(jnp.float32)))), err


def test_blocks_divide_the_cache_and_fill_the_programs():
    assert decode_attention._blocks(32768, 8) == (128, 32, 8)  # batch 1, 8 kv heads: 256
    # 32,896 slots = 257 blocks of 128 (a prime): 29 splits of 9 blocks, the last of 5
    assert decode_attention._blocks(32768 + 128, 8) == (128, 29, 9)
    assert decode_attention._blocks(144, 2) == (16, 9, 1)
    assert decode_attention._blocks(4096 + 16, 64 * 8) == (16, 1, 257)
