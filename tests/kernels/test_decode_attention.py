"""The decode-attention kernel (one query per row over layer l of the cache stack, read in
place) in Pallas interpret mode against the einsum attention (the oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from mixtral_jax.kernels import decode_attention
from mixtral_jax.model.attention import dot_product_attention


@pytest.mark.parametrize(
    "size,dtype,tol,programs",
    [
        (144, jnp.float32, 1e-5, None),
        (1024, jnp.float32, 1e-5, None),
        (272, jnp.bfloat16, 2e-2, None),
        (128 * 67, jnp.float32, 1e-5, None),  # 67 blocks in 34 splits of 2: a ragged last split
        # one split: each program writes its normalized output (no combine)
        (1024, jnp.float32, 1e-5, 1),
        (272, jnp.bfloat16, 2e-2, 1),
    ],
)
@pytest.mark.parametrize("n,kv", [(8, 2), (32, 8)])  # (32, 8), one split: q read in place
def test_kernel_equals_the_einsum_attention_of_the_chosen_layer(size, dtype, tol, programs, n, kv):
    b, h, layers = 2, 16, 3
    keys = jax.random.split(jax.random.key(size), 3)
    q = jax.random.normal(keys[0], (b, n, h), dtype)
    k_cache = jax.random.normal(keys[1], (layers, b, size, kv, h), dtype)
    v_cache = jax.random.normal(keys[2], (layers, b, size, kv, h), dtype)
    filled = size - 9  # an empty tail, row 1 left-padded by 5: both masked
    mask = np.zeros((b, size), bool)
    mask[:, :filled] = True
    mask[1, :5] = False
    tiles = decode_attention.DECODE_TILES
    if programs is not None:
        tiles = tiles._replace(programs=programs)
        assert decode_attention._blocks(size, b * kv, tiles.max_block, programs)[1] == 1
        layout = decode_attention.queries_for(jnp.zeros((b, n, h)), kv, 1, dtype)[0]
        assert layout.packed == (n >= 16)
    run = jax.jit(
        lambda q, k, v, i: decode_attention.decode_attention(
            q, k, v, i, jnp.asarray(mask), tiles=tiles, interpret=True
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
    assert decode_attention._blocks(32768, 8) == (128, 32)  # batch 1, 8 kv heads: 256
    assert decode_attention._blocks(32768 + 128, 8) == (128, 32)
    assert decode_attention._blocks(144, 2) == (16, 9)
    assert decode_attention._blocks(4096 + 16, 64 * 8) == (16, 1)


def test_seen_span_is_the_first_to_the_last_block_with_a_seen_key():
    mask = np.zeros((4, 64), bool)
    mask[0, :20] = True  # blocks 0-1 of 16
    mask[1, 33:50] = True  # a window: blocks 2-3
    mask[2, [5, 60]] = True  # two keys far apart: every block between
    span = decode_attention.seen_span(jnp.asarray(mask), 16)  # row 3 sees none
    assert np.asarray(span).tolist() == [[0, 2], [2, 4], [0, 4], [0, 0]]


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_splits_share_a_row_span_without_overlap(splits):
    """Every block of the span goes to exactly one split, in order, whatever J."""
    span = jnp.asarray([[0, 0], [2, 9], [5, 6], [0, 17]], jnp.int32)

    def kernel(span_ref, out_ref):
        b, j = pl.program_id(0), pl.program_id(1)
        start, stop = decode_attention.split_range(span_ref, b, j, splits)
        out_ref[b, j, 0], out_ref[b, j, 1] = start, stop

    got = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((4, splits, 2), jnp.int32),
        grid=(4, splits),
        interpret=True,
    )(span)
    for row, (first, end) in enumerate(np.asarray(span)):
        pieces = np.asarray(got[row])
        covered = [i for start, stop in pieces for i in range(start, stop)]
        assert covered == list(range(first, end))


def test_blocks_outside_the_span_are_not_read():
    """NaN keys and values in blocks no key of which the row sees leave the output finite and
    equal to the einsum's over a clean cache."""
    b, n, kv, h, size = 2, 4, 1, 16, 512
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (b, n, h))
    k_cache = jax.random.normal(keys[1], (1, b, size, kv, h))
    v_cache = jax.random.normal(keys[2], (1, b, size, kv, h))
    mask = np.zeros((b, size), bool)
    mask[0, :100] = True
    mask[1, 256:300] = True
    dirty = [c.at[0, 0, 128:].set(jnp.nan).at[0, 1, :256].set(jnp.nan) for c in (k_cache, v_cache)]
    got = decode_attention.decode_attention(q, *dirty, 0, jnp.asarray(mask), interpret=True)
    want = dot_product_attention(q[:, None], k_cache[0], v_cache[0], jnp.asarray(mask)[:, None])
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[:, 0]), rtol=1e-5, atol=1e-5)
