"""The paged decode-attention kernel (one query per row, following its block table through the
pool, read in place) in Pallas interpret mode against the gather + einsum oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import paged_attention
from mixtral_jax.kernels.decode_attention import AttentionTiles
from mixtral_jax.model.attention import dot_product_attention
from mixtral_jax.model.paged_kv_cache import gather_rows, paged_attention_mask


@pytest.mark.parametrize(
    "entries,window,dtype,tol,tiles",
    [
        (5, None, jnp.float32, 1e-5, paged_attention.PAGED_TILES),
        (4, 20, jnp.bfloat16, 2e-2, paged_attention.PAGED_TILES),
        # several entries a loop step, a ragged last step; many splits of few entries
        (5, None, jnp.float32, 1e-5, AttentionTiles(blocks_per_step=2)),
        (7, 40, jnp.float32, 1e-5, AttentionTiles(blocks_per_step=3, programs=64)),
        # one split (B * K programs are enough): each program writes its normalized output
        (5, None, jnp.float32, 1e-5, AttentionTiles(blocks_per_step=4, programs=1)),
        (4, 20, jnp.bfloat16, 2e-2, AttentionTiles(blocks_per_step=2, programs=1)),
    ],
)
def test_kernel_equals_the_gathered_einsum_attention_of_the_chosen_layer(
    entries, window, dtype, tol, tiles
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
            q, k, v, i, jnp.asarray(table), mask, tiles=tiles, interpret=True
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


@pytest.mark.parametrize("per_step", [1, 3])
def test_only_the_entries_a_row_sees_are_read(per_step):
    """Entries past a row's length name the sink block; with NaN there (or in any block the
    row does not see) the kernel's output is still the oracle's over a clean pool: those blocks
    are never read. (The gather oracle itself would turn NaN keys into NaN.)"""
    b, n, kv, h, z, entries = 4, 4, 1, 16, 16, 32  # a wide table, short rows
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (b, n, h))
    k_pool = jax.random.normal(keys[1], (1, 40, z, kv, h))
    v_pool = jax.random.normal(keys[2], (1, 40, z, kv, h))
    table = np.zeros((b, entries), np.int32)  # entry 0: the sink
    lengths = np.array([0, 20, 70, 33], np.int32)
    used = (lengths + 1 + z - 1) // z
    for row in range(b):
        table[row, : used[row]] = 1 + row * 5 + np.arange(used[row])
    mask = paged_attention_mask(jnp.asarray(lengths), 1, jnp.ones((b, 1), bool), entries * z, 40)[
        :, 0
    ]
    # the sink, and row 2's first block (below its window of 40: 70 - 40 = 30 > 16)
    dirty = (
        k_pool.at[0, 0].set(jnp.nan).at[0, 11].set(jnp.nan),
        v_pool.at[0, 0].set(jnp.nan).at[0, 11].set(jnp.nan),
    )
    got = paged_attention.paged_decode_attention(
        q,
        *dirty,
        0,
        jnp.asarray(table),
        mask,
        tiles=AttentionTiles(blocks_per_step=per_step),
        interpret=True,
    )
    rows_k = gather_rows(k_pool, jnp.int32(0), jnp.asarray(table))
    rows_v = gather_rows(v_pool, jnp.int32(0), jnp.asarray(table))
    want = dot_product_attention(q[:, None], rows_k, rows_v, mask[:, None])[:, 0]
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_one_split_normalizes_in_the_kernel_as_the_combine_does():
    """J = 1 (each program divides and writes its output) gives the J = 4 path's output (float32
    partials merged by `combine_splits`), and a row whose mask is all False (an inactive row)
    reads 0 in both, not NaN."""
    b, n, kv, h, z, entries = 3, 4, 2, 16, 16, 4
    keys = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(keys[0], (b, n, h))
    k_pool = jax.random.normal(keys[1], (1, 14, z, kv, h))
    v_pool = jax.random.normal(keys[2], (1, 14, z, kv, h))
    table = jnp.asarray(1 + np.arange(b * entries).reshape(b, entries), jnp.int32)
    lengths = jnp.asarray([63, 30, 5], jnp.int32)
    mask = paged_attention_mask(lengths, 1, jnp.ones((b, 1), bool), entries * z, None)[:, 0]
    mask = mask.at[2].set(False)  # row 2 sees no key
    run = functools.partial(
        paged_attention.paged_decode_attention, q, k_pool, v_pool, 0, table, mask, interpret=True
    )
    assert paged_attention.num_splits(entries, b * kv, 1) == 1
    assert paged_attention.num_splits(entries, b * kv, 4 * b * kv) == 4
    one = run(tiles=AttentionTiles(blocks_per_step=2, programs=1))
    four = run(tiles=AttentionTiles(blocks_per_step=2, programs=4 * b * kv))
    np.testing.assert_array_equal(np.asarray(one[2]), 0.0)
    np.testing.assert_array_equal(np.asarray(four[2]), 0.0)
    np.testing.assert_allclose(np.asarray(one), np.asarray(four), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "n,kv,dtype,tol,window",
    [
        (32, 8, jnp.float32, 1e-5, None),  # 8x7B's heads: G = 4 of Gp = 16
        (32, 8, jnp.bfloat16, 2e-2, 20),
        (16, 2, jnp.float32, 1e-5, None),  # G = 8: the last head's rows are the last Gp
        (48, 4, jnp.float32, 1e-5, 40),  # G = 12, Gp = 16: windows overlap two heads
    ],
)
def test_one_split_reads_the_queries_in_place_and_stores_only_its_rows(n, kv, dtype, tol, window):
    """With one split and N >= Gp the kernel reads q [B, N, H] in place and stores each head's
    rows with a masked store (no padded q or output); the oracle's output, and 0 for a row
    that sees no key."""
    b, h, z, entries = 3, 16, 16, 4
    keys = jax.random.split(jax.random.key(n + kv), 3)
    q = jax.random.normal(keys[0], (b, n, h), dtype)
    k_pool = jax.random.normal(keys[1], (2, b * entries + 1, z, kv, h), dtype)
    v_pool = jax.random.normal(keys[2], (2, b * entries + 1, z, kv, h), dtype)
    table = jnp.asarray(1 + np.arange(b * entries).reshape(b, entries), jnp.int32)
    lengths = jnp.asarray([63, 30, 5], jnp.int32)
    mask = paged_attention_mask(lengths, 1, jnp.ones((b, 1), bool), entries * z, window)[:, 0]
    mask = mask.at[2].set(False)  # row 2 sees no key
    tiles = AttentionTiles(blocks_per_step=2, programs=1)
    assert paged_attention.num_splits(entries, b * kv, tiles.programs) == 1
    got = paged_attention.paged_decode_attention(
        q, k_pool, v_pool, 1, table, mask, tiles=tiles, interpret=True
    )
    rows_k = gather_rows(k_pool, jnp.int32(1), table)
    rows_v = gather_rows(v_pool, jnp.int32(1), table)
    want = dot_product_attention(q[:, None], rows_k, rows_v, mask[:, None])[:, 0]
    assert got.shape == (b, n, h) and got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got[2].astype(jnp.float32)), 0.0)
    err = float(jnp.max(jnp.abs(got[:2].astype(jnp.float32) - want[:2].astype(jnp.float32))))
    assert err <= tol * float(jnp.max(jnp.abs(want.astype(jnp.float32)))), err


def test_blocks_must_tile():
    pool = jnp.zeros((1, 3, 8, 2, 16))
    with pytest.raises(ValueError, match="block_size=8 must be a multiple of 16"):
        paged_attention.paged_decode_attention(
            jnp.zeros((1, 4, 16)), pool, pool, 0, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 16))
        )
