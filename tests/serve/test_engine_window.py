"""The serving engine with a sliding window: blocks that left a row's window go back to the pool
as it advances, so a long generation holds O(window) blocks, and its greedy tokens still equal
`Generator`'s (infer.py's loop, a rolling buffer of W slots).

Tiny model, window 8, blocks of 4: a decoding row holds at most ceil(7 / 4) + 1 = 3 blocks, a
prefill chunk of 8 at most ceil(14 / 4) + 1 = 5. Two rows of 104 tokens (26 blocks each
without freeing) share a pool of 10 blocks, so freed blocks are reused by the other row while
it runs: one freed a block too early would read the other's keys and change its tokens. The
engine's warmup compiles every shape the run then uses (counted by jax.monitoring).
"""

import contextlib
import queue

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.generate import Generator
from mixtral_jax.serve.blocks import BlockTables, blocks_at_once
from mixtral_jax.serve.engine import Engine, Request, TooLong

WINDOW, BLOCK, CHUNK, NEW = 8, 4, 8, 90
PROMPTS = [[int(t) for t in np.random.default_rng(n).integers(3, 500, 6 + 9 * n)] for n in (1, 2)]


@pytest.fixture(scope="module")
def model():
    """The tiny model with a window of 8, weights 10x their init (logits far from ties),
    committed to the device as a loaded checkpoint is."""
    cfg = mj.ModelConfig.tiny(sliding_window=WINDOW, max_seq_len=128)
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, mj.get_params(mj.init(cfg, 1)))
    return mj.from_params(cfg, jax.device_put(params, jax.devices()[0]))


@contextlib.contextmanager
def _compiles():
    """Counts XLA compilations inside the block: yields a list that gets one entry each."""
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_blocks_at_once():
    assert blocks_at_once(103, BLOCK, None) == 26
    assert blocks_at_once(103, BLOCK, WINDOW) == 3
    assert blocks_at_once(103, BLOCK, 9) == 3  # keys i-8 .. i: entries (i-8)//4 .. i//4
    assert blocks_at_once(5, BLOCK, 64) == 2  # a short row holds all of itself


def test_block_tables_cover_slide_and_release():
    tables = BlockTables(num_blocks=6, rows=2, entries_per_row=8, block_size=BLOCK)
    tables.cover(0, 9)  # tokens 0..8: 3 blocks, the lowest first
    assert tables.table[0, :4].tolist() == [1, 2, 3, 0] and tables.free == 2
    tables.slide(0, 7)  # keys from 7 on: block 0 (tokens 0..3) left, block 1 (4..7) stays
    assert tables.table[0, :3].tolist() == [0, 2, 3] and tables.held(0) == 2
    assert tables.short(0, 13) == 1 and tables.covered(0) == 12
    tables.cover(1, 8)  # the freed block goes to the other row
    assert tables.table[1, :2].tolist() == [1, 4] and tables.free == 1
    with pytest.raises(RuntimeError, match="2 blocks short, 1 free"):
        tables.cover(0, 20)
    tables.release(0)
    assert tables.table[0].tolist() == [0] * 8 and tables.free == 3 and tables.held(0) == 0


def _run(engine, streams, got: list, most: list) -> None:
    """Steps the engine to the end: each stream's tokens into got, the most blocks each row
    held after a decode step into most (and never more than a prefill chunk needs)."""
    for _ in range(400):
        if not engine.run_once():
            return
        for n, stream in enumerate(streams):
            with contextlib.suppress(queue.Empty):
                while True:
                    got[n] += stream.get(timeout=0).tokens
        for i, row in enumerate(engine._sched.rows):
            if row is not None:
                held = engine._tables.held(i)
                assert held <= 5, (i, row.cached, held)
                if len(row.generated) >= 2:  # after a decode step
                    most[i] = max(most[i], held)


def test_a_long_windowed_generation_holds_o_window_blocks_and_equals_the_generator(model):
    want = Generator(model).generate(PROMPTS, max_new_tokens=NEW, eos_id=None).tokens
    engine = Engine(
        model,
        max_batch=2,
        block_size=BLOCK,
        num_blocks=11,
        prefill_chunk=CHUNK,
        prefill_budget=CHUNK,  # one chunk a step
        max_context=128,
        spans=(128,),
    )
    with _compiles() as warm:
        engine.warmup()
    # the decode step and the decode step with a chunk per compiled batch (1, 2), one width;
    # sampling with and without top-k / top-p for 1 and 2 rows
    assert engine.batches == [1, 2] and len(warm) == 4 + 4
    streams = [engine.submit(Request(p, NEW, ignore_eos=True)) for p in PROMPTS]
    got, most = [[], []], [0, 0]
    with _compiles() as steady:
        _run(engine, streams, got, most)
    assert got == want
    assert most == [3, 3] and engine.stats()["preemptions"] == 0
    assert engine.stats()["free_blocks"] == 10
    assert not steady  # warmup compiled every shape steady state runs (the pool committed)
    # without a window, the same request alone needs more than the pool holds
    plain = Engine(
        mj.from_params(model.cfg.replace(sliding_window=None), mj.get_params(model)),
        max_batch=1,
        block_size=BLOCK,
        num_blocks=11,
        max_context=128,
    )
    with pytest.raises(TooLong, match="needs 26 KV blocks of 4 tokens at once; the pool has 10"):
        plain.validate(Request(PROMPTS[0], NEW))
