"""Prefill by a token budget: a burst of prompts enters several per step, running streams keep
getting a token every step, and no step prefills more than the budget.

One engine of 16 rows (one compiled decode batch and span), prefill chunks of 8 tokens and a
budget of 32 (prefill groups of 1 and 4 rows), stepped by `run_once`, so iterations are
counted, not timed; `Generator` is the oracle of greedy tokens.
"""

import contextlib
import math
import queue

import numpy as np
import pytest

from mixtral_jax.config import ConfigError
from mixtral_jax.generate import Generator
from mixtral_jax.serve.engine import Engine, Request, default_prefill_budget

CHUNK, BUDGET, ROWS = 8, 32, 16


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(
        model,
        max_batch=ROWS,
        block_size=8,
        prefill_chunk=CHUNK,
        prefill_budget=BUDGET,
        max_context=64,
        batches=(ROWS,),
    )
    assert eng.chunk_rows == [1, 4] and eng.widths == [8]
    eng.warmup()
    # the decode step, and with each prefill group; sampling with and without top-k / top-p
    # for 16 rows (the batch), 1 and 4 (the groups)
    assert eng.steps.traces == 3 + 2 * 3
    yield eng
    eng.shutdown()


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 500, n)]


def _tokens(engine, streams) -> list[list[int]]:
    """Steps the engine until every stream finished: each one's tokens."""
    got, done = [[] for _ in streams], [False] * len(streams)
    for _ in range(500):
        engine.run_once()
        for n, stream in enumerate(streams):
            with contextlib.suppress(queue.Empty):
                while not done[n]:
                    event = stream.get(timeout=0)
                    got[n] += event.tokens
                    done[n] = event.finish is not None
        if all(done):
            return got
    raise AssertionError("streams did not finish")


def _greedy(model, prompts, new: int) -> list[list[int]]:
    return Generator(model).generate(prompts, max_new_tokens=new, eos_id=None).tokens


def test_a_burst_is_admitted_budget_tokens_a_step_while_a_stream_decodes(engine, model):
    """12 prompts of one chunk each arrive at once beside a running stream: all are prefilled
    within ceil(12 x 8 / 32) = 3 iterations (not 12), no iteration prefills more than the
    budget, and the running stream samples a token in every one of them."""
    runner = engine.submit(Request(_prompt(CHUNK, 1), 12, ignore_eos=True))
    engine.run_once()  # prefilled; its first token is sampled
    n = 12
    prompts = [_prompt(CHUNK, 100 + k) for k in range(n)]
    burst = [engine.submit(Request(p, 6, ignore_eos=True)) for p in prompts]
    row = next(engine._sched.rows[i] for i in engine._sched.live())
    iterations = 0
    while engine.stats()["queue_depth"] or engine.stats()["prefilling"]:
        before, dispatched = engine.stats(), row.dispatched
        engine.run_once()
        iterations += 1
        after = engine.stats()
        assert after["prefill_tokens"] - before["prefill_tokens"] <= BUDGET
        assert row.dispatched == dispatched + 1  # the running stream's token, every step
        assert iterations <= n
    assert iterations == math.ceil(n * CHUNK / BUDGET) == 3
    assert engine.stats()["running"] == n + 1
    got = _tokens(engine, [runner, *burst])
    assert got == _greedy(model, [_prompt(CHUNK, 1)], 12) + _greedy(model, prompts, 6)
    assert engine.steps.traces == 3 + 2 * 3  # the group sizes of the burst were all compiled


def test_long_prompts_take_several_group_rows_and_equal_the_generator(engine, model):
    """Prompts of 3 chunks (8 + 8 + 4 tokens): one call prefills several chunks of one prompt
    in consecutive group rows (each sees the keys the rows before it wrote in the same layer)
    beside chunks of other prompts; 12 chunks at 4 a step take 3 iterations."""
    prompts = [_prompt(20, 200 + k) for k in range(4)]
    streams = [engine.submit(Request(p, 8, ignore_eos=True)) for p in prompts]
    iterations = 0
    while engine.stats()["queue_depth"] or engine.stats()["prefilling"]:
        engine.run_once()
        iterations += 1
    assert iterations == math.ceil(4 * math.ceil(20 / CHUNK) / (BUDGET // CHUNK)) == 3
    assert _tokens(engine, streams) == _greedy(model, prompts, 8)
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


def test_the_budget_defaults_to_four_chunks_and_holds_at_least_one(model):
    default = Engine(
        model, max_batch=2, block_size=8, num_blocks=9, max_context=64, prefill_chunk=64
    )
    assert default.prefill_budget == 256  # 4 chunks: 2 decode rows + 256 fit the grouped kernel
    assert default.chunk_rows == [1, 4]  # like the decode batches: the powers of 4 below
    # decode rows and a full group stay within the grouped decode kernel's tokens (512)
    assert default_prefill_budget(2, 128) == 384  # 2 + 4 x 128 would be 514
    assert default_prefill_budget(256, 128) == 256
    assert default_prefill_budget(512, 128) == 128  # never below one chunk
    wide = Engine(model, max_batch=2, num_blocks=9, prefill_chunk=16, prefill_budget=200)
    assert wide.chunk_rows == [1, 4, 12]  # 12 chunks of 16 fit 200 tokens
    with pytest.raises(ConfigError, match="prefill_budget=64 must be >= prefill_chunk=128"):
        Engine(model, max_batch=2, prefill_budget=64)
    with pytest.raises(ConfigError, match="prefill_budget=0 must be an integer >= 1"):
        Engine(model, max_batch=2, prefill_budget=0)
