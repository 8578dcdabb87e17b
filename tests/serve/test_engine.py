"""The serving engine: continuous batching over the paged KV cache, on the tiny model.

One engine (max_batch 4, blocks of 8, prefill chunks of 8 tokens and two a step, a pool of 32
blocks: half of max_batch x context; steps compiled for spans of 32 and 128 tokens) serves every
test, stepped on the test's thread by `run_once` (determinate interleavings), and by its own
thread in the last test; `Generator` (infer.py's loop) is the oracle of greedy tokens (of
prompts prefilled in one chunk, and in two chunks of one call: "chunks", 30 tokens, is 16 + 14).
"""

import queue

import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.config import ConfigError
from mixtral_jax.generate import Generator, SamplingParams
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.moe.ops import route_logits
from mixtral_jax.serve import engine as engine_module
from mixtral_jax.serve.engine import Engine, EngineClosed, Event, QueueFull, Request, TooLong

CONTEXT, BLOCK = 128, 8


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(
        model,
        max_batch=4,
        block_size=BLOCK,
        num_blocks=33,
        prefill_chunk=8,
        prefill_budget=16,  # two chunks a step: prefill groups of 1 and 2 rows
        max_context=CONTEXT,
        spans=(32,),  # rows up to 32 tokens attend over 4 blocks, longer ones over all 16
    )
    assert eng.widths == [4, 16] and eng.chunk_rows == [1, 2]
    eng.warmup()
    yield eng
    eng.shutdown()


def _prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 500, n)]


# Every prompt whose greedy tokens a test checks: the oracle runs them all in one batch.
PROMPTS = {
    "short": _prompt(5, 5),
    "mid": _prompt(19, 19),
    "chunks": _prompt(30, 30),
    "long": _prompt(60, 60),
    "stop": _prompt(13, 13),
    **{f"thread{n}": _prompt(4 + 7 * n, 40 + n) for n in range(6)},
}


@pytest.fixture(scope="module")
def reference(model):
    """{name: 60 greedy tokens} from Generator (left-padded batch: equal to each alone)."""
    names = list(PROMPTS)
    result = Generator(model).generate([PROMPTS[n] for n in names], max_new_tokens=60, eos_id=None)
    return dict(zip(names, result.tokens))


def _drain(engine, streams, limit=2000):
    """Steps the engine until every stream finished: [(tokens, finish, routing)] per stream."""
    got = [([], None, []) for _ in streams]
    for _ in range(limit):
        engine.run_once()
        for n, stream in enumerate(streams):
            while True:
                try:
                    event = stream.get(timeout=0)
                except queue.Empty:
                    break
                got[n][0].extend(event.tokens)
                got[n][2].extend(event.routing or [])
                got[n] = (got[n][0], event.finish, got[n][2])
        if all(g[1] is not None for g in got):
            return got
    raise AssertionError("streams did not finish")


def _events(stream, timeout=60):
    """Every event of a stream up to its finish (a hung stream fails the test, not the run)."""
    events = [stream.get(timeout=timeout)]
    while events[-1].finish is None:
        events.append(stream.get(timeout=timeout))
    return events


def _others(count: int) -> list[Request]:
    """Neighbours of different lengths, max_tokens and sampling settings."""
    out = []
    for n in range(count):
        sampling = SamplingParams(temperature=0.9, top_k=20) if n % 2 else SamplingParams()
        out.append(Request(_prompt(3 + 5 * n, 100 + n), 2 + 3 * n, sampling, seed=n))
    return out


def test_greedy_tokens_equal_the_generator_alone_and_among_eight_others(engine, reference):
    prompts = [PROMPTS[n] for n in ("short", "mid", "chunks")]
    want = [reference[n][:10] for n in ("short", "mid", "chunks")]
    alone = [_drain(engine, [engine.submit(Request(p, 10, ignore_eos=True))])[0] for p in prompts]
    assert [a[0] for a in alone] == want and {a[1] for a in alone} == {"length"}
    # eight others join and leave around them (4 rows: most wait, then take freed rows)
    others = _others(8)
    mixed = others[:3] + [Request(prompts[0], 10, ignore_eos=True)] + others[3:6]
    mixed += [Request(prompts[1], 10, ignore_eos=True)] + others[6:]
    mixed += [Request(prompts[2], 10, ignore_eos=True)]
    got = _drain(engine, [engine.submit(r) for r in mixed])
    assert [got[3][0], got[7][0], got[10][0]] == want
    assert [len(g[0]) for g in got] == [r.max_tokens for r in mixed]  # nothing lost
    stats = engine.stats()
    assert stats["running"] == 0 and stats["free_blocks"] == stats["total_blocks"] == 32


def test_a_step_is_dispatched_before_the_last_ones_tokens_are_streamed_at_the_smallest_batch(
    engine, reference, monkeypatch
):
    batches, real = [], engine.steps.decode

    def recording(pool, last, slots, *rest):  # the decode step alone: which batch it ran
        batches.append(len(slots))
        return real(pool, last, slots, *rest)

    monkeypatch.setattr(engine.steps, "decode", recording)
    stream = engine.submit(Request(PROMPTS["short"], 3, ignore_eos=True))
    engine.run_once()  # its prompt (one chunk) is prefilled and its first token sampled ...
    with pytest.raises(queue.Empty):
        stream.get(timeout=0)  # ... on the device: nothing streamed yet
    engine.run_once()  # the second token's step is dispatched, then the first token streamed
    assert stream.get(timeout=0).tokens == reference["short"][:1]
    assert batches == [1]  # one decoding row: the compiled batch of 1, not max_batch (4)
    got = _drain(engine, [stream])[0]
    assert reference["short"][:3] == reference["short"][:1] + got[0] and got[1] == "length"
    assert batches == [1, 1]  # max_tokens 3: two decode steps, none after the last token


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(engine):
    hot = SamplingParams(temperature=1.0, top_p=0.95)
    request = Request(_prompt(11, 7), 12, hot, seed=1234, ignore_eos=True)
    alone = _drain(engine, [engine.submit(request)])[0][0]
    among = _drain(engine, [engine.submit(r) for r in [*_others(3), request, *_others(2)]])
    assert among[3][0] == alone
    other_seed = Request(request.prompt, 12, hot, seed=99, ignore_eos=True)
    assert _drain(engine, [engine.submit(other_seed)])[0][0] != alone
    # temperature alone: sampled without the top-k / top-p sort when no row filters, with it
    # among neighbours that do (top_k 20): the same tokens either way
    plain = Request(_prompt(9, 8), 12, SamplingParams(temperature=0.8), seed=7, ignore_eos=True)
    alone = _drain(engine, [engine.submit(plain)])[0][0]
    among = _drain(engine, [engine.submit(r) for r in [*_others(2), plain]])
    assert among[2][0] == alone and engine.stats()["traces"] == 18  # nothing compiled


def test_cancel_frees_the_row_and_its_blocks_within_one_step(engine):
    running = engine.submit(Request(_prompt(20, 3), 60, ignore_eos=True))  # 10 blocks
    queued = [engine.submit(Request(_prompt(4, 4), 40, ignore_eos=True)) for _ in range(4)]  # 6
    for _ in range(6):
        engine.run_once()
    assert engine.stats()["running"] == 4 and engine.stats()["queue_depth"] == 1
    assert engine.stats()["free_blocks"] < 32
    for stream in [running, *queued]:
        stream.cancel()
    engine.run_once()
    stats = engine.stats()
    assert stats["running"] == 0 and stats["queue_depth"] == 0 and stats["free_blocks"] == 32
    assert stats["cancel_lag"] == 0  # cancelled between steps: gone before the next one ran
    events = [_events(s) for s in [running, *queued]]
    assert all(e[-1].finish == "cancelled" for e in events)
    assert sum(len(x.tokens) for x in events[0]) >= 1  # it had been producing


def test_a_failed_step_recomputes_the_running_requests_and_the_engine_goes_on(
    engine, reference, monkeypatch
):
    """Rows with tokens cached and streamed when a step fails are recomputed like preempted
    ones: every stream still yields exactly its greedy tokens (none twice, none lost)."""
    names = ["short", "mid"]
    running = [engine.submit(Request(PROMPTS[n], 20, ignore_eos=True)) for n in names]
    for _ in range(4):
        engine.run_once()
    assert all(engine._sched.rows[i].generated for i in engine._sched.live())  # mid-stream
    real, failed = (engine.steps.decode, engine.steps.decode_with_chunk), []

    def broken(*args):  # whichever call runs next fails, once
        failed.append(1)
        monkeypatch.setattr(engine.steps, "decode", real[0])
        monkeypatch.setattr(engine.steps, "decode_with_chunk", real[1])
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.steps, "decode", broken)
    monkeypatch.setattr(engine.steps, "decode_with_chunk", broken)
    later = engine.submit(Request(PROMPTS["chunks"], 10, ignore_eos=True))
    before = engine.stats()["preemptions"]
    got = _drain(engine, [*running, later])
    assert [g[:2] for g in got] == [(reference[n][:20], "length") for n in names] + [
        (reference["chunks"][:10], "length")
    ]
    assert failed and engine.stats()["preemptions"] == before  # a failure is not one
    assert engine.stats()["free_blocks"] == 32


def test_a_request_whose_steps_keep_failing_ends_with_error_after_one_retry(engine, monkeypatch):
    """A request goes back to the queue MAX_RETRIES times, not forever (a livelock that grew
    the process by ~45 MB/s while the failures' tracebacks piled up): one with nothing cached,
    and one that had streamed tokens."""
    assert engine_module.MAX_RETRIES == 1
    fresh = engine.submit(Request(PROMPTS["short"], 4, ignore_eos=True))
    streaming = engine.submit(Request(PROMPTS["mid"], 30, ignore_eos=True))
    for _ in range(3):
        engine.run_once()
    fresh.cancel()
    engine.run_once()  # the cancelled one leaves; the other streams on
    streaming.get(timeout=0)
    fresh = engine.submit(Request(PROMPTS["short"], 4, ignore_eos=True))
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("always")

    monkeypatch.setattr(engine.steps, "decode", broken)
    monkeypatch.setattr(engine.steps, "decode_with_chunk", broken)
    for _ in range(5):
        engine.run_once()
    for stream in (fresh, streaming):
        assert _events(stream)[-1] == Event([], None, "error", "RuntimeError: always")
    assert len(calls) == 2 and engine.stats()["queue_depth"] == 0
    assert engine.stats()["free_blocks"] == 32


def test_many_short_and_one_long_fit_a_pool_smaller_than_batch_times_context(engine, reference):
    assert engine._tables.total < engine.max_batch * CONTEXT // BLOCK
    long = Request(PROMPTS["long"], 60, ignore_eos=True)  # 119 tokens: 15 of the 32 blocks
    shorts = [Request(_prompt(6, 10 + n), 30, ignore_eos=True) for n in range(9)]  # 5 each
    streams = [engine.submit(long)] + [engine.submit(s) for s in shorts]
    for _ in range(3):
        engine.run_once()
    assert engine.stats()["running"] == 4  # the long one and three short ones at once
    got = _drain(engine, streams)
    assert got[0][0] == reference["long"]
    # 15 + 9 x 5 = 60 blocks went through a pool of 32: freed blocks were reused
    assert all(len(g[0]) == 30 for g in got[1:]) and engine.stats()["free_blocks"] == 32


def test_a_pool_too_small_for_every_row_preempts_the_youngest_and_loses_no_token(
    engine, reference, monkeypatch
):
    """Four requests of 8-15 blocks each (45) in a pool of 32: the youngest rows are preempted
    as the older ones grow, recomputed later, and every stream still yields exactly the tokens
    of an unconstrained run (greedy, and seeded sampling: none twice, none lost), then frees its
    blocks."""
    names = ["long", "chunks", "mid", "short"]
    assert sum(engine.blocks_needed(Request(PROMPTS[n], 60)) for n in names) > 32
    evicted = []  # (request, tokens it had streamed) of each row preempted
    real = engine._sched.preempt

    def preempt(i):
        row = engine._sched.rows[i]
        evicted.append((row.request, len(row.generated)))
        real(i)

    monkeypatch.setattr(engine._sched, "preempt", preempt)
    requests = [Request(PROMPTS[n], 60, ignore_eos=True) for n in names[:3]]
    hot = SamplingParams(temperature=0.9, top_k=20)  # the youngest: sampled, seeded, traced
    requests.append(Request(PROMPTS["short"], 60, hot, seed=5, routing=True, ignore_eos=True))
    alone = _drain(engine, [engine.submit(requests[-1])])[0]
    before = engine.stats()["preemptions"]
    evicted.clear()
    got = _drain(engine, [engine.submit(r) for r in requests])
    assert [g[0] for g in got[:3]] == [reference[n] for n in names[:3]]
    assert got[-1][0] == alone[0]  # its key for token i is fold_in(key(seed), i), recomputed
    assert {g[1] for g in got} == {"length"}
    assert engine.stats()["preemptions"] - before == len(evicted)
    assert max(n for _, n in evicted) > 0 and requests[-1] in [r for r, _ in evicted]
    # the youngest's routing traces (it was preempted): one per token, as when it ran alone;
    # alone its steps ran the compiled batch of 1, here that of 4 (float32 sums in another
    # order: weights agree to ~2e-5, the experts exactly)
    assert len(got[-1][2]) == 60
    for trace, want in zip(got[-1][2], alone[2]):
        assert [[e for e, _ in layer] for layer in trace] == [[e for e, _ in la] for la in want]
        np.testing.assert_allclose(
            [[w for _, w in layer] for layer in trace],
            [[w for _, w in la] for la in want],
            atol=1e-4,
        )
    assert engine.stats()["free_blocks"] == 32 and engine.stats()["queue_depth"] == 0


def test_stop_ids_eos_and_routing_traces(engine, model, reference):
    prompt, want = PROMPTS["stop"], reference["stop"][:8]
    cut = next(i for i in range(1, 8) if want[i] not in want[:i])
    got = _drain(engine, [engine.submit(Request(prompt, 8, stop_ids=(want[cut],)))])[0]
    assert got[:2] == (want[:cut], "stop")
    engine.eos_id = want[cut]
    try:
        eos = _drain(
            engine,
            [engine.submit(Request(prompt, 8)), engine.submit(Request(prompt, 8, ignore_eos=True))],
        )
    finally:
        engine.eos_id = model.cfg.eos_token_id
    assert eos[0][:2] == (want[:cut], "eos") and eos[1][:2] == (want, "length")
    traced = _drain(engine, [engine.submit(Request(prompt, 8, routing=True, ignore_eos=True))])[0]
    assert traced[0] == want and len(traced[2]) == 8
    # token i was chosen at position len(prompt) - 1 + i: the full forward's routing there
    out = model(jnp.asarray([prompt + want]))
    routing = route_logits(out.aux.layers.router_logits[:, 0], model.cfg.num_experts_per_tok)
    for i, trace in enumerate(traced[2]):
        pos = len(prompt) - 1 + i
        assert [[e for e, _ in layer] for layer in trace] == routing.experts[:, pos].tolist()
        np.testing.assert_allclose(
            [[w for _, w in layer] for layer in trace], routing.weights[:, pos], atol=1e-5
        )


def test_bad_requests_too_long_and_a_full_queue(engine, model):
    with pytest.raises(
        TooLong, match="100 tokens \\+ max_tokens=29 = 129 exceeds the context of 128"
    ):
        engine.validate(Request(_prompt(100, 0), 29))
    small = Engine(model, max_batch=2, block_size=BLOCK, num_blocks=5, max_queue=2, max_context=64)
    wide = Engine(mj.from_params(model.cfg.replace(max_seq_len=8192), mj.get_params(model)))
    assert wide.widths == [32, 128, 512]  # spans 512, 2048, 8192 of blocks of 16
    with pytest.raises(ConfigError, match="spans: 0 must be an integer in \\[1, max_context\\]"):
        Engine(model, spans=(0,))
    with pytest.raises(TooLong, match="needs 5 KV blocks of 8 tokens at once; the pool has 4"):
        small.submit(Request(_prompt(30, 0), 10))
    for bad, message in [
        (Request([], 4), "prompt must be a non-empty"),
        (Request([1, 512], 4), "token id 512 is outside the vocabulary \\[0, 512\\)"),
        (Request([1, 2], 0), "max_tokens=0 must be an integer >= 1"),
        (Request([1, 2], 4, seed=-1), "seed=-1 must be an integer in \\[0, 2\\*\\*32\\)"),
        (Request([1, 2], 4, stop_ids=(600,)), "stop_ids=\\(600,\\)"),
    ]:
        with pytest.raises(ConfigError, match=message):
            small.submit(bad)
    streams = [small.submit(Request([1, 2], 4)) for _ in range(2)]
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        small.submit(Request([1, 2], 4))
    small.shutdown()  # never started: the queued requests are cancelled
    assert [s.get(timeout=1).finish for s in streams] == ["cancelled"] * 2
    with pytest.raises(EngineClosed):
        small.submit(Request([1, 2], 4))


def test_the_default_pool_fits_the_free_device_memory(model, monkeypatch):
    per_block = 2 * 2 * 2 * 16 * BLOCK * 4  # k and v, 2 layers, 2 kv heads x 16, float32
    free = engine_module.MEMORY_RESERVE + 20 * per_block
    monkeypatch.setattr(engine_module, "device_free_bytes", lambda: free)
    eng = Engine(model, max_batch=4, block_size=BLOCK, max_context=CONTEXT)
    assert eng.block_bytes() == per_block and eng.num_blocks == 20  # not 4 x 16 + 1
    monkeypatch.setattr(engine_module, "device_free_bytes", lambda: free - 10 * per_block)
    with pytest.raises(ConfigError, match="one row of max_context=128 needs 0.0 GiB"):
        Engine(model, max_batch=4, block_size=BLOCK, max_context=CONTEXT)


def test_the_paged_kernel_chosen_by_auto_needs_whole_tiles_of_blocks(model, monkeypatch):
    """On an NVIDIA GPU `auto` takes the paged attention kernel: a block size it cannot tile is
    one line naming the value, the limit and the way out (the gather takes any size)."""
    monkeypatch.setattr(kernel_plan, "platform", lambda: kernel_plan.NVIDIA_GPU)
    with pytest.raises(ConfigError, match="block_size=8 must be a multiple of 16 .* auto"):
        Engine(model, max_batch=2, block_size=8, num_blocks=9, max_context=32)
    gather = mj.from_params(model.cfg.replace(paged_attention_impl="off"), mj.get_params(model))
    assert Engine(gather, max_batch=2, block_size=8, num_blocks=9, max_context=32).block_size == 8


def test_the_engine_thread_streams_and_shuts_down_finishing_in_flight(engine, reference):
    """Last: starts the shared engine's thread. Nothing was compiled after warmup."""
    engine.start()
    prompts = [PROMPTS[f"thread{n}"] for n in range(6)]
    streams = [engine.submit(Request(p, 12, ignore_eos=True)) for p in prompts]
    dropped = engine.submit(Request(_prompt(9, 50), 100, ignore_eos=True))
    first = dropped.get(timeout=60)
    assert first.tokens and first.finish is None
    dropped.cancel()  # while the engine thread steps: freed before the step after the next
    assert _events(dropped)[-1].finish == "cancelled"
    assert engine.stats()["cancel_lag"] <= 1
    engine.shutdown(cancel=False, timeout=60)  # in-flight requests run to the end
    for n, stream in enumerate(streams):
        events = _events(stream)
        assert [t for e in events for t in e.tokens] == reference[f"thread{n}"][:12]
        assert events[-1].finish == "length" and stream.first_token_at >= stream.submitted
    with pytest.raises(EngineClosed):
        engine.submit(Request([1, 2], 4))
    # a decode step, and one with a prefill group of 1 and of 2 rows, per (batch, width), and
    # sampling with and without top-k / top-p per row count (1, 2, 4), compiled once each by
    # warmup: the requests above, greedy and sampled, compiled nothing more
    assert engine.batches == [1, 4]
    assert engine.stats()["traces"] == 3 * len(engine.batches) * len(engine.widths) + 6 == 18
