"""Per-row sampling (`sample_rows`) equals `sample` row by row, whatever the neighbours."""

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.generate.sampling import (
    RowSampling,
    SamplingParams,
    needs_filters,
    sample,
    sample_rows,
)

SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=0.7, top_k=9, top_p=0.9),
    SamplingParams(temperature=2.0, top_k=1),
]


def _rows(settings, seeds, counters) -> RowSampling:
    return RowSampling(
        temperature=jnp.asarray([s.temperature for s in settings], jnp.float32),
        top_k=jnp.asarray([s.top_k for s in settings], jnp.int32),
        top_p=jnp.asarray([s.top_p for s in settings], jnp.float32),
        seed=jnp.asarray(seeds, jnp.uint32),
        counter=jnp.asarray(counters, jnp.int32),
    )


def test_each_row_equals_sample_with_its_own_settings_and_key():
    logits = jax.random.normal(jax.random.key(0), (len(SETTINGS), 40)) * 3
    fn = jax.jit(sample_rows)
    for trial in range(3):
        seeds, counters = [11 * trial + r for r in range(6)], [trial] * 6
        rows = _rows(SETTINGS, seeds, counters)
        got = np.asarray(fn(logits, rows))
        keys = rows.keys()
        for b, params in enumerate(SETTINGS):
            want = int(sample(logits[b : b + 1], keys[b], params)[0])
            assert got[b] == want, (trial, b)
        # a row's draw does not depend on its neighbours: reversed batch, same tokens
        back = np.asarray(fn(logits[::-1], _rows(SETTINGS[::-1], seeds[::-1], counters)))
        assert back[::-1].tolist() == got.tolist()


def test_greedy_batch_is_argmax_and_seeds_change_draws():
    logits = jax.random.normal(jax.random.key(1), (4, 64))
    fn = jax.jit(sample_rows)
    greedy = _rows([SamplingParams()] * 4, [0, 1, 2, 3], [0] * 4)
    assert np.asarray(fn(logits, greedy)).tolist() == np.argmax(logits, -1).tolist()
    hot = [SamplingParams(temperature=1.0)] * 4
    same = jnp.broadcast_to(logits[:1], (4, 64))
    draws = {
        tuple(np.asarray(fn(same, _rows(hot, [s] * 4, [c] * 4))).tolist())
        for s in range(3)
        for c in range(3)
    }
    assert all(len(set(d)) == 1 for d in draws)  # equal settings, seed and counter: equal tokens
    assert len({d[0] for d in draws}) > 1  # other seeds / counters: other tokens


def test_sample_rows_has_no_conditional():
    """No cond in the compiled step: on a GPU its predicate is copied to the host, which then
    waits for the whole forward before it can dispatch the next step."""
    rows = RowSampling(
        temperature=jnp.zeros(3, jnp.float32),
        top_k=jnp.zeros(3, jnp.int32),
        top_p=jnp.ones(3, jnp.float32),
        seed=jnp.zeros(3, jnp.uint32),
        counter=jnp.zeros(3, jnp.int32),
    )
    jaxpr = str(jax.make_jaxpr(sample_rows)(jnp.zeros((3, 11), jnp.float32), rows))
    assert "cond[" not in jaxpr and "while[" not in jaxpr


def test_without_filters_rows_that_ask_for_none_draw_the_same_tokens():
    """filters=False (no sort) equals the full sampler on greedy and temperature-only rows;
    `needs_filters` says when a batch needs the full one."""
    plain = [SamplingParams(), SamplingParams(temperature=0.8), SamplingParams(temperature=1.7)]
    logits = jax.random.normal(jax.random.key(2), (len(plain), 50)) * 2
    logits = logits.at[1, 7].set(-jnp.inf)  # a masked logit stays never drawn
    for trial in range(4):
        rows = _rows(plain, [trial, trial + 1, trial + 2], [trial] * 3)
        want = np.asarray(jax.jit(sample_rows)(logits, rows))
        got = np.asarray(jax.jit(lambda x, r: sample_rows(x, r, filters=False))(logits, rows))
        assert got.tolist() == want.tolist(), trial
    assert not needs_filters(_rows(plain, [0] * 3, [0] * 3))
    # a greedy row's filters do not count; a sampled row's do
    cold = [SamplingParams(top_k=5), SamplingParams(top_p=0.5), SamplingParams(temperature=1.0)]
    assert not needs_filters(_rows(cold, [0] * 3, [0] * 3))
    for hot in (SamplingParams(temperature=1.0, top_k=3), SamplingParams(0.5, top_p=0.9)):
        assert needs_filters(_rows([*plain, hot], [0] * 4, [0] * 4))
