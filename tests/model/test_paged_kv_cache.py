"""The paged KV cache: `Mixtral.extend_paged` equals the full forward and the contiguous
`extend`, with rows at different lengths, scattered blocks, partial chunks and a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.config import DecodeAttentionImpl
from mixtral_jax.kernels import paged_attention
from mixtral_jax.kernels.plan import KernelPlan
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.paged_kv_cache import (
    PagedGroup,
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
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
    full = [np.asarray(forward(params, jnp.asarray(seqs[r : r + 1]))[0]) for r in range(2)]
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
    graphdef, state = nnx.split(mj.init(cfg, 2))
    prompt = jnp.asarray(np.random.default_rng(2).integers(3, cfg.vocab_size, (1, 9)))

    @jax.jit
    def both(state, prompt):  # one compile for the four calls
        model, positions, one = nnx.merge(graphdef, state), jnp.arange(9)[None], jnp.ones((1, 1))
        _, kv = model.extend(
            prompt[:, :8],
            KVCache.create(cfg, 1, 16),
            positions=positions[:, :8],
            valid=jnp.ones((1, 8), bool),
        )
        want, _ = model.extend(prompt[:, 8:], kv, positions=positions[:, 8:], valid=one)
        cache = PagedKVCache.create(cfg, 1, 8, BLOCK, 4)
        marker = jnp.full(cache.k.shape, 7.0, cache.k.dtype)
        table = jnp.asarray([[5, 2, 6, 0]], jnp.int32)
        cache = cache.replace(k=marker, v=marker, block_table=table)
        _, cache = model.extend_paged(prompt[:, :8], cache, valid=jnp.ones((1, 8), bool))
        got, cache = model.extend_paged(prompt[:, 8:], cache, valid=one)
        return want.logits, got.logits, cache, kv

    want, got, cache, kv = both(state, prompt)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
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


def test_the_paged_decode_kernel_in_the_model_equals_the_gather(monkeypatch):
    """A plan with paged_attention pallas runs kernels/paged_attention.py in decode steps (here
    in interpret mode) and gives the gather oracle's logits; prefill chunks keep the gather."""
    calls, kernel_fn = [], paged_attention.paged_decode_attention

    def interpreted(*args, **kwargs):
        calls.append(1)
        return kernel_fn(*args, **kwargs, interpret=True)

    monkeypatch.setattr(
        "mixtral_jax.model.attention.paged_decode.paged_decode_attention", interpreted
    )
    cfg = mj.ModelConfig.tiny(sliding_window=20)
    graphdef, state = nnx.split(mj.init(cfg, 3))
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, cfg.vocab_size, (2, 24)))
    kernel = KernelPlan(paged_attention=DecodeAttentionImpl.PALLAS)

    @jax.jit
    def both(state, tokens):  # one compile: a prefill, then one decode step each way
        model = nnx.merge(graphdef, state)
        cache = PagedKVCache.create(cfg, 2, 7, 16, 3).replace(
            block_table=jnp.asarray([[4, 1, 6], [2, 5, 3]], jnp.int32)
        )
        _, cache = model.extend_paged(tokens[:, :22], cache, valid=jnp.ones((2, 22), bool))
        assert not calls
        step = jnp.asarray([[True], [False]])  # row 1 idle
        got, _ = model.extend_paged(tokens[:, 22:23], cache, valid=step, plan=kernel)
        want, _ = model.extend_paged(tokens[:, 22:23], cache, valid=step, plan=KernelPlan())
        return got.logits, want.logits

    got, want = both(state, tokens)
    assert calls
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_a_decode_step_and_a_prefill_chunk_in_one_call_equal_them_apart():
    """extend_paged_groups: rows 0 and 1 decode while row 2 prefills a chunk, one call (one
    MoE over all their tokens): the logits, the pool and the lengths of two separate calls."""
    cfg = mj.ModelConfig.tiny()
    graphdef, state = nnx.split(mj.init(cfg, 4))
    tokens = jnp.asarray(np.random.default_rng(4).integers(3, cfg.vocab_size, (3, 12)))
    table = jnp.asarray(_tables(3, 3, 4))

    @jax.jit
    def both(state, tokens):
        model = nnx.merge(graphdef, state)
        cache = PagedKVCache.create(cfg, 3, 10, BLOCK, 3).replace(block_table=table)
        ready = jnp.asarray([[True] * 6 + [False] * 2] * 2 + [[True] * 3 + [False] * 5])
        _, cache = model.extend_paged(tokens[:, :8], cache, valid=ready)  # lengths 6, 6, 3
        decode = PagedGroup(tokens[:2, 6:7], table[:2], cache.lengths[:2], jnp.ones((2, 1), bool))
        chunk = PagedGroup(tokens[2:, 3:7], table[2:], cache.lengths[2:], jnp.ones((1, 4), bool))
        (d, p), (k, v), lengths = model.extend_paged_groups((decode, chunk), cache.k, cache.v)
        apart = []
        for g in (decode, chunk):
            view = cache.replace(block_table=g.block_table, lengths=g.lengths)
            out, view = model.extend_paged(g.tokens, view, valid=g.valid)
            apart.append(out.logits)
            cache = cache.replace(k=view.k, v=view.v)
        return (d.logits, p.logits), apart, (k, v), (cache.k, cache.v), lengths, d.aux

    together, apart, pool, pool_apart, lengths, aux = both(state, tokens)
    for got, want in zip(together, apart):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pool[0], pool_apart[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool[1], pool_apart[1], rtol=1e-5, atol=1e-6)
    assert [x.tolist() for x in lengths] == [[7, 7], [7]]
    assert aux.layers.router_logits.shape == (cfg.num_layers, 2, 1, cfg.num_experts)
