"""The paged KV cache: `Mixtral.extend_paged` equals the full forward and the contiguous
`extend`, with rows at different lengths, scattered blocks, partial chunks and a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.paged_kv_cache import (
    PagedKVCache,
    gather_rows,
    paged_attention_mask,
    write_locations,
)

BLOCK = 4


def _extend_paged(model):
    graphdef, state = nnx.split(model)
    return jax.jit(
        lambda s, t, c, v: nnx.merge(graphdef, s).extend_paged(t, c, valid=v),
        donate_argnums=(2,),
    ), state


def _tables(rows: int, per_row: int, seed: int) -> np.ndarray:
    """Every row's blocks drawn without replacement from 1..P-1, shuffled: nothing contiguous."""
    blocks = np.random.default_rng(seed).permutation(np.arange(1, rows * per_row + 1))
    return blocks.reshape(rows, per_row).astype(np.int32)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window"])
def test_extend_paged_equals_the_full_forward_per_row(window):
    """Two rows of 11 and 6 prompt tokens, prefilled in chunks of 4 (the last ones partial and
    at different offsets), then 6 decode steps, row 1 idle for two of them: every valid logit
    equals the full forward of that row alone."""
    cfg = mj.ModelConfig.tiny(sliding_window=window)
    model = mj.init(cfg, 1)
    rng = np.random.default_rng(1)
    lengths, total = (11, 6), 18
    seqs = rng.integers(3, cfg.vocab_size, (2, total)).astype(np.int32)
    full = [np.asarray(model(jnp.asarray(seqs[r : r + 1])).logits[0]) for r in range(2)]
    per_row = -(-total // BLOCK)
    table = _tables(2, per_row, 0)
    cache = PagedKVCache.create(cfg, 2, 2 * per_row + 1, BLOCK, per_row)
    cache = cache.replace(block_table=jnp.asarray(table))
    step, state = _extend_paged(model)
    got = [{}, {}]  # absolute index -> logits
    done = [0, 0]

    def run(width, counts):
        nonlocal cache
        tokens = np.zeros((2, width), np.int32)
        valid = np.zeros((2, width), bool)
        for r, n in enumerate(counts):
            tokens[r, :n] = seqs[r, done[r] : done[r] + n]
            valid[r, :n] = True
        out, cache = step(state, jnp.asarray(tokens), cache, jnp.asarray(valid))
        logits = np.asarray(out.logits)
        for r, n in enumerate(counts):
            for t in range(n):
                got[r][done[r] + t] = logits[r, t]
            done[r] += n

    while done[0] < lengths[0] or done[1] < lengths[1]:  # chunked prefill, width 4
        run(4, [min(4, lengths[r] - done[r]) for r in range(2)])
    for i in range(6):  # decode: one token per row; row 1 idle at steps 2 and 3
        run(1, [1, 0 if i in (2, 3) else 1])
    assert list(np.asarray(cache.lengths)) == done
    for r in range(2):
        idx = sorted(got[r])
        want = np.stack([full[r][i] for i in idx])
        have = np.stack([got[r][i] for i in idx])
        assert np.max(np.abs(have - want)) / np.max(np.abs(want)) <= 1e-5, r


def test_extend_paged_equals_contiguous_extend_and_writes_only_its_blocks():
    """One decode step over a prefilled prompt: the same logits as `extend` over a KVCache, and
    the pool blocks no row owns (but the sink) keep their contents."""
    cfg = mj.ModelConfig.tiny()
    model = mj.init(cfg, 2)
    prompt = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (1, 9)))
    positions = jnp.arange(9)[None]
    _, kv = model.extend(
        prompt[:, :8],
        KVCache.create(cfg, 1, 16),
        positions=positions[:, :8],
        valid=jnp.ones((1, 8), bool),
    )
    want, _ = model.extend(prompt[:, 8:], kv, positions=positions[:, 8:], valid=jnp.ones((1, 1)))
    cache = PagedKVCache.create(cfg, 1, 8, BLOCK, 4)
    marker = jnp.full(cache.k.shape, 7.0, cache.k.dtype)
    cache = cache.replace(k=marker, v=marker, block_table=jnp.asarray([[5, 2, 6, 0]], jnp.int32))
    _, cache = model.extend_paged(prompt[:, :8], cache, valid=jnp.ones((1, 8), bool))
    got, cache = model.extend_paged(prompt[:, 8:], cache, valid=jnp.ones((1, 1), bool))
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    untouched = [1, 3, 4, 7]
    assert bool(jnp.all(cache.k[:, untouched] == 7.0)) and bool(jnp.all(cache.v[:, untouched] == 7))
    # the row's 9 tokens, in index order through its table, equal the contiguous cache's
    rows = gather_rows(cache.k, jnp.int32(1), cache.block_table)[:, :8]
    np.testing.assert_allclose(rows, kv.k[1, :, :8], rtol=1e-6)


def test_write_locations_mask_and_sink():
    cfg = mj.ModelConfig.tiny()
    cache = PagedKVCache.create(cfg, 2, 6, BLOCK, 2).replace(
        block_table=jnp.asarray([[3, 1], [0, 0]], jnp.int32), lengths=jnp.asarray([3, 0])
    )
    valid = jnp.asarray([[True, True, False], [False, False, False]])
    blocks, offsets = write_locations(cache, 3, valid)
    assert blocks.tolist() == [[3, 1, 0], [0, 0, 0]]  # index 3 -> block 3 @3, 4 -> block 1 @0
    assert offsets.tolist() == [[3, 0, 0], [0, 0, 0]]
    mask = paged_attention_mask(cache.lengths, 3, valid, 8, window=2)
    assert mask[0, 0].tolist() == [False, False, True, True, False, False, False, False]
    assert mask[0, 1].tolist() == [False, False, False, True, True, False, False, False]
    assert not bool(mask[1].any()) and not bool(mask[0, 2].any())
