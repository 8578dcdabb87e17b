"""Continuous batching over a paged KV cache: requests join and leave a running batch.

One background thread steps the model. Each iteration:
  1. cancelled requests leave (their row and KV blocks free at once);
  2. the scheduler (`scheduler.py`) decides which rows run and gives them the KV blocks their
     new tokens fill, oldest first: with a sliding window, blocks that left a row's window
     return to the pool; when the pool is short, the youngest row is preempted (its blocks
     freed, its request back at the head of the queue with what it generated, recomputed
     later), as vLLM does; then waiting requests take free rows, first come first served;
  3. one decode step [b, 1] for every row that has sampled a token, b the smallest compiled
     batch that holds them (their inputs packed into its first rows, the rest idle and
     masked: a step of one stream computes one row, not max_batch), in the same compiled call
     as a prefill group [q, C] of the prompt tokens the scheduler gave the rows still
     prefilling (oldest first, `prefill_budget` P tokens at most, in chunks of C =
     `prefill_chunk`: one group row per chunk, so a burst of short prompts enters together
     and a long prompt takes several rows), q the smallest compiled count of group rows that
     holds the chunks (`chunk_rows`). Streams already running keep producing while prompts
     are prefilled, and the group costs them its arithmetic, not a second weight read;
  4. the previous step's tokens go to their streams (while this one runs on the device); rows
     that finished (EOS, a stop id, max_tokens) leave.
Only those two calls are ever compiled: the decode step once per (batch, attention span), the
decode step with a prefill group once per (batch, span, group rows) (`steps.py`; `warmup`);
`inputs.py` packs their host inputs.

The inter-token latency bound. Every step carries at most P prompt tokens, so a step that
prefills takes at most the decode step's time plus that of P tokens' arithmetic beside it (the
weights are read once for both). A running stream's gap between two tokens is therefore at most
t_decode + P x t_token, and P chosen so that P tokens' arithmetic costs no more than one decode
step's weight read keeps every gap within 2x a decode-only one: on one H200 with 8x7B in bf16
the step reads ~93 GB (~20-30 ms at the measured 3-4 TB/s) and a token's arithmetic is
2 x 12.9 GFLOP, ~40-50 us at a grouped matmul's ~500-600 TFLOP/s, so P ~ 500. The default,
4 chunks of the default C = 128 = 512 tokens, is that, where the decode rows leave room for it
(`default_prefill_budget`); a burst then enters four 128-token prompts per step. `bench/engine.py` prints the ratio measured per decode batch (the step with a
full prefill group over the decode step alone): a ratio above 2 at the batches a server runs
says lower P.

The sampled tokens never wait for the host: each step writes them into a device array of the
last token per row (`Steps`), which the next step reads, so step N+1 is dispatched before step
N's tokens are copied out and streamed, and the host's work hides behind the device's. A row
that turns out to have ended (EOS or a stop id) was decoded once more for nothing: that result
is dropped, and its blocks were freed before any later step could take them. A row preempted
while its last token was in flight samples that token again when it is recomputed (same
sampling counter, same key).

A row's tokens depend on its own request only: per-row positions and lengths in the paged
cache, per-row sampling settings, and keys fold_in(key(seed), token index).
"""

from __future__ import annotations

import logging
import math
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.config import ConfigError, DecodeAttentionImpl
from mixtral_jax.generate.sampling import SamplingParams
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.common import MAX_GROUPED_TOKENS
from mixtral_jax.kernels.paged_attention import MIN_BLOCK
from mixtral_jax.model.paged_kv_cache import PagedKVCache
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.serve import inputs
from mixtral_jax.serve.blocks import BlockTables, blocks_at_once
from mixtral_jax.serve.rows import CANCELLED, EOS, ERROR, LENGTH, STOP, Event, Request, Row, Stream
from mixtral_jax.serve.scheduler import Scheduler
from mixtral_jax.serve.steps import Steps

__all__ = ["Engine", "EngineClosed", "Event", "QueueFull", "Request", "Stream", "TooLong"]

log = logging.getLogger(__name__)
# Device memory left free beside a default-sized pool: activations and temporaries of the
# compiled steps (a gathered [B, S, K, H] layer, the MoE's sorted tokens) and compilation.
MEMORY_RESERVE = 8 << 30
_MAX_SEED = 2**32


class QueueFull(Exception):
    """submit() while the waiting queue is at its limit (HTTP 429)."""


class TooLong(ConfigError):
    """prompt + max_tokens beyond the context or the KV capacity (HTTP 400); names the numbers."""


MAX_RETRIES = 1  # times a request is recomputed after failed steps before it ends with 'error'


class EngineClosed(RuntimeError):
    """submit() after shutdown() began (HTTP 503)."""


def device_free_bytes() -> int | None:
    """Free memory of the default device by its allocator's own count, or None where it keeps
    none (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _token(value, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


def _positive(name: str, value, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


class Engine:
    """Serves one model: `submit` requests, read their streams.

    Args:
      model: the model (its cfg fixes widths and the context).
      max_batch: B, rows decoded together.
      max_queue: requests waiting for a row at most (more: QueueFull).
      block_size: Z, tokens per KV block.
      num_blocks: blocks in the pool, the sink included; default enough for every row at the
        full context (max_batch * ceil(max_context / Z) + 1), or what fits in the device's free
        memory less a reserve (`MEMORY_RESERVE`) if that is less (ConfigError, naming the
        GiB, if not even one row at the full context fits).
      prefill_chunk: C, prompt tokens per chunk: a row of a step's prefill group.
      prefill_budget: P, prompt tokens per step at most (P // C chunks; ConfigError if below
        C); default `default_prefill_budget`: see the latency bound in the module docstring. The prefill group
        is compiled for P // C rows and the powers of 4 below (`chunk_rows`; default 1, 4).
      eos_id: the end-of-sequence id (default the model's eos_token_id).
      max_context: the longest prompt + max_tokens (default and limit: cfg.max_seq_len).
      batches: the decode batch sizes the steps are compiled for (each step runs the smallest
        that holds its decoding rows); default max_batch and the powers of 4 below it, 1
        included (256 -> 1, 4, 16, 64, 256): a few compiles, at most 4x the rows needed.
      spans: the attention spans (tokens) the steps are compiled for: each call attends over
        the smallest span that holds its longest row (a step of short rows reads no more than
        it needs); default max_context and its quarters, sixteenths, ... down to 512 tokens.
        Each span is one decode shape and one decode + prefill chunk shape.
    """

    def __init__(
        self,
        model: Mixtral,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        block_size: int = 16,
        num_blocks: int | None = None,
        prefill_chunk: int = 128,
        prefill_budget: int | None = None,
        eos_id: int | None = None,
        max_context: int | None = None,
        spans: tuple[int, ...] | None = None,
        batches: tuple[int, ...] | None = None,
    ):
        cfg = self.cfg = model.cfg
        self.max_batch = _positive("max_batch", max_batch)
        self.max_queue = _positive("max_queue", max_queue, 0)
        self.block_size = _positive("block_size", block_size)
        self.prefill_chunk = _positive("prefill_chunk", prefill_chunk)
        if prefill_budget is None:
            budget = default_prefill_budget(max_batch, prefill_chunk)
        else:
            budget = prefill_budget
        self.prefill_budget = _positive("prefill_budget", budget)
        if self.prefill_budget < self.prefill_chunk:
            raise ConfigError(
                f"prefill_budget={budget} must be >= prefill_chunk={prefill_chunk} "
                "(a step prefills at least one chunk)"
            )
        self.chunk_rows = _powers_of_4(self.prefill_budget // self.prefill_chunk)
        self.max_context = _positive("max_context", max_context or cfg.max_seq_len)
        if self.max_context > cfg.max_seq_len:
            raise ConfigError(
                f"max_context={max_context} exceeds the model's max_seq_len={cfg.max_seq_len}"
            )
        self.blocks_per_row = math.ceil(self.max_context / block_size)
        self.widths = self._widths(spans)  # table entries per row of each compiled shape
        self.batches = self._batches(batches)  # decode rows of each compiled shape
        if num_blocks is None:
            num_blocks = self._default_blocks()
        self.num_blocks = _positive("num_blocks", num_blocks, 2)
        plan = kernel_plan.resolve(cfg, max_batch, cached=True, queries=1)
        if plan.paged_attention == DecodeAttentionImpl.PALLAS and block_size % MIN_BLOCK:
            raise ConfigError(
                f"block_size={block_size} must be a multiple of {MIN_BLOCK} for the paged "
                "attention kernel (paged_attention_impl auto on NVIDIA GPUs, or pallas); "
                "paged_attention_impl=off takes any block size"
            )
        self.eos_id = cfg.eos_token_id if eos_id is None else eos_id
        self.steps = Steps(model)
        self._pool = self._new_pool()
        self._last = self._new_last()
        self._pending = None  # the dispatched step whose tokens are not yet delivered
        self._cond = threading.Condition()
        self._tables = BlockTables(num_blocks, max_batch, self.blocks_per_row, block_size)
        self._sched = Scheduler(
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefill_budget=self.prefill_budget,
            tables=self._tables,
            window=cfg.sliding_window,
            cond=self._cond,
        )
        self._step_lock = threading.Lock()
        self._closed = self._cancel_on_close = False
        self._thread: threading.Thread | None = None
        self.generated_tokens = self.decode_steps = self.prefill_calls = self.calls = 0
        self.prefill_tokens = 0
        self.cancel_lag = 0
        # host seconds spent dispatching model calls and waiting for their tokens: a step whose
        # dispatch time nears its step time is host-bound (the device waits for the launches)
        self.dispatch_s = self.wait_s = 0.0

    def block_bytes(self) -> int:
        """Bytes of one KV block: k and v, every layer."""
        cfg = self.cfg
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        return per_token * self.block_size * jnp.dtype(cfg.compute.dtype).itemsize

    def _default_blocks(self) -> int:
        """Every row at the full context, or what the device's free memory holds."""
        full = self.max_batch * self.blocks_per_row + 1
        free = device_free_bytes()
        if free is None:
            return full
        fits = int((free - MEMORY_RESERVE) // self.block_bytes())
        if fits < self.blocks_per_row + 1:
            need = (self.blocks_per_row + 1) * self.block_bytes()
            raise ConfigError(
                f"the KV cache for one row of max_context={self.max_context} needs "
                f"{need / 2**30:.1f} GiB beside a reserve of {MEMORY_RESERVE / 2**30:.0f} GiB; "
                f"the device has {free / 2**30:.1f} GiB free: lower max_context or num_blocks"
            )
        return min(full, fits)

    def _widths(self, spans: tuple[int, ...] | None) -> list[int]:
        """Table widths (entries) of the compiled shapes, ascending; the widest holds
        max_context."""
        if spans is None:
            spans, span = [self.max_context], self.max_context // 4
            while span >= 512:
                spans.append(span)
                span //= 4
        for span in spans:
            if not isinstance(span, int) or not 1 <= span <= self.max_context:
                raise ConfigError(f"spans: {span!r} must be an integer in [1, max_context]")
        widths = {math.ceil(span / self.block_size) for span in spans} | {self.blocks_per_row}
        return sorted(widths)

    def _batches(self, batches: tuple[int, ...] | None) -> list[int]:
        """Decode batch sizes of the compiled shapes, ascending; the largest is max_batch."""
        if batches is None:
            batches = _powers_of_4(self.max_batch)
        for size in batches:
            if (
                not isinstance(size, int)
                or isinstance(size, bool)
                or not 1 <= size <= self.max_batch
            ):
                raise ConfigError(f"batches: {size!r} must be an integer in [1, max_batch]")
        return sorted(set(batches) | {self.max_batch})

    def _batch(self, rows: int) -> int:
        """The smallest compiled decode batch that holds `rows` rows."""
        return next(b for b in self.batches if b >= rows)

    def _width(self, tokens: int) -> int:
        """The narrowest compiled table width whose rows hold `tokens` tokens."""
        return next(w for w in self.widths if w * self.block_size >= tokens)

    def _new_last(self) -> jax.Array:
        """The device's last sampled token per row [max_batch] (what each step feeds)."""
        return self._committed(jnp.zeros((self.max_batch,), jnp.int32))

    def _new_pool(self):
        """An empty pool (`_committed`)."""
        cache = PagedKVCache.create(
            self.cfg, 1, self.num_blocks, self.block_size, self.blocks_per_row
        )
        return self._committed((cache.k, cache.v))

    def _committed(self, tree):
        """`tree` committed to the model's device like the arrays the steps return: a call with
        an uncommitted input is compiled apart from one with a committed input (one trace, two
        executables), so `warmup` would miss the shapes steady state runs. (A model over several
        devices leaves them to jit's placement: the pool is not sharded.)"""
        devices = jax.tree.leaves(self.steps.state)[0].devices()
        return jax.device_put(tree, next(iter(devices))) if len(devices) == 1 else tree

    # ---- the interface ----------------------------------------------------------------------
    def blocks_needed(self, request: Request) -> int:
        """KV blocks a request holds at most at one time: those of prompt + max_tokens - 1
        tokens (the last token sampled is never fed back), or with a sliding window those of
        the window's keys (`blocks_at_once`)."""
        tokens = len(request.prompt) + request.max_tokens - 1
        return blocks_at_once(tokens, self.block_size, self.cfg.sliding_window)

    def validate(self, request: Request) -> None:
        """Raises ConfigError (TooLong for length) naming the field, value and rule; no side
        effects."""
        vocab = self.cfg.vocab_size
        prompt = request.prompt
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ConfigError("prompt must be a non-empty list of token ids")
        if not all(_token(t, vocab) for t in prompt):
            bad = next(t for t in prompt if not _token(t, vocab))
            raise ConfigError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        _positive("max_tokens", request.max_tokens)
        if not isinstance(request.sampling, SamplingParams):
            raise ConfigError(f"sampling={request.sampling!r} must be a SamplingParams")
        seed = request.seed
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _MAX_SEED:
            raise ConfigError(f"seed={seed!r} must be an integer in [0, 2**32)")
        if not all(_token(t, vocab) for t in request.stop_ids):
            raise ConfigError(f"stop_ids={request.stop_ids!r} must be token ids in [0, {vocab})")
        total = len(prompt) + request.max_tokens
        if total > self.max_context:
            raise TooLong(
                f"prompt of {len(prompt)} tokens + max_tokens={request.max_tokens} = {total} "
                f"exceeds the context of {self.max_context} tokens"
            )
        need = self.blocks_needed(request)
        if need > self._tables.total:
            raise TooLong(
                f"prompt of {len(prompt)} tokens + max_tokens={request.max_tokens} needs {need} "
                f"KV blocks of {self.block_size} tokens at once; the pool has "
                f"{self._tables.total}"
            )

    def submit(self, request: Request) -> Stream:
        """Validates and queues a request; its stream yields events as it runs.

        Raises:
          ConfigError / TooLong: a bad request (nothing queued).
          QueueFull: max_queue requests already wait.
          EngineClosed: shutdown() has begun.
        """
        self.validate(request)
        stream = Stream(request, self._wake, lambda: self.calls)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down and admits no new requests")
            if len(self._sched.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full: {self.max_queue} requests are waiting")
            self._sched.waiting.append(stream)
            self._cond.notify_all()
        return stream

    def start(self) -> None:
        """Starts the engine thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mixtral-engine", daemon=True)
            self._thread.start()

    def shutdown(self, cancel: bool = True, timeout: float | None = None) -> None:
        """Stops admitting; cancels (or, with cancel=False, finishes) every queued and running
        request, then joins the thread. A finish that outlasts `timeout` seconds is cancelled."""
        with self._cond:
            self._closed, self._cancel_on_close = True, cancel
            self._cond.notify_all()
        if self._thread is None:
            self._cancel_everything()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._cancel_on_close = True
                self._cond.notify_all()
            self._thread.join()

    def stats(self) -> dict:
        """queue_depth (preempted requests included), running (rows held; prefilling of
        them), free_blocks, total_blocks, generated_tokens (monotonic), steps (decode steps),
        prefill_calls, prefill_tokens (prompt tokens prefilled, recomputed ones included),
        calls (model calls: every step), preemptions, cancel_lag (the most
        model calls any cancelled row ran between its cancel() and the release of its row),
        traces (compiles), dispatch_s and wait_s (host seconds dispatching model calls and
        waiting for their tokens)."""
        rows = [r for r in self._sched.rows if r is not None]
        return {
            "queue_depth": len(self._sched.waiting),
            "running": len(rows),
            "prefilling": sum(r.prefilling for r in rows),
            "free_blocks": self._tables.free,
            "total_blocks": self._tables.total,
            "generated_tokens": self.generated_tokens,
            "steps": self.decode_steps,
            "prefill_calls": self.prefill_calls,
            "prefill_tokens": self.prefill_tokens,
            "calls": self.calls,
            "preemptions": self._sched.preemptions,
            "cancel_lag": self.cancel_lag,
            "traces": self.steps.traces,
            "dispatch_s": self.dispatch_s,
            "wait_s": self.wait_s,
        }

    def warmup(self) -> None:
        """Compiles (and runs once, every row idle: writes go to the sink) every step shape:
        the decode step per batch and table width, and the decode step with a prefill group
        per batch, width and group rows; and the sampling of each batch's and group's rows, with
        top-k / top-p and without."""
        with self._step_lock:
            chunks = [self._chunk_args([], {}, rows)[0] for rows in self.chunk_rows]
            pool, last = self._pool, self._last
            sampled = {}  # rows -> (slots, a StepOutput, sampling) to compile `sample` for
            for batch in self.batches:
                decode, _ = self._decode_args([], batch)
                for width in self.widths:
                    pool, last, out = self.steps.decode(pool, last, *_narrow(decode, width))
                    sampled[batch] = (decode[0], out, decode[4])
                    for chunk in chunks:
                        pool, last, _, first = self.steps.decode_with_chunk(
                            pool, last, _narrow(decode, width), _narrow(chunk, width)
                        )
                        sampled[len(chunk[5])] = (chunk[5], first, chunk[4])
            for slots, out, sampling in sampled.values():
                for filters in (False, True):
                    last, _ = self.steps.sample(last, slots, out, sampling, force=filters)
            self._pool, self._last = jax.block_until_ready((pool, last))

    def run_once(self) -> bool:
        """One iteration on the caller's thread (tests, tools; not together with start()).
        Returns whether there was anything to do."""
        with self._step_lock:
            return self._iterate()

    # ---- the engine thread --------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _busy(self) -> bool:
        return bool(self._sched.waiting) or bool(self._sched.live())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._busy() and not self._closed:
                    self._cond.wait()
                if self._closed and (self._cancel_on_close or not self._busy()):
                    break
            with self._step_lock:
                worked = self._iterate()
            if not worked:  # only requests that cannot be admitted yet: do not spin
                with self._cond:
                    self._cond.wait(timeout=0.01)
        self._cancel_everything()

    def _iterate(self) -> bool:
        """Steps 1-4 of the module docstring. An exception (a device or XLA failure, or a bug)
        resets the pool (the donated one may be gone, and every row's KV with it) and drops
        the step in flight; every request holding a row is then recomputed like a preempted
        one (`Scheduler.requeue`: back to the head of the queue with the tokens it streamed;
        the one in flight is sampled again, with the same key), `MAX_RETRIES` times at most
        per request (a request whose own step keeps failing would otherwise be retried
        forever): after that it ends with finish 'error'. The engine carries on."""
        try:
            return self._step()
        except Exception as err:
            log.exception("engine step failed")
            self._pool, self._last, self._pending = self._new_pool(), self._new_last(), None
            error = Event([], None, ERROR, f"{type(err).__name__}: {err}")
            for i in self._sched.live():
                row = self._sched.rows[i]
                row.stream.failures += 1
                if row.stream.failures <= MAX_RETRIES:
                    self._sched.requeue(i)
                else:
                    self._sched.leave(i, error)
            return True

    def _step(self) -> bool:
        self._reap()
        decoding, prefilling, pieces = self._sched.plan()
        if not decoding and not prefilling:
            return self._deliver_pending()
        decode, decode_need = self._decode_args(decoding)
        width = self._width(decode_need)
        prefilled, finals = None, {}
        if prefilling:  # one call: the decode step (rows may all be idle) and a prefill group
            chunk, chunk_need, finals = self._chunk_args(prefilling, pieces)
            width = self._width(max(decode_need, chunk_need))
            dispatch_start = time.perf_counter()
            self._pool, self._last, decoded, prefilled = self.steps.decode_with_chunk(
                self._pool, self._last, _narrow(decode, width), _narrow(chunk, width)
            )
            self.prefill_calls += 1
            self.prefill_tokens += sum(pieces[i] for i in prefilling)
        else:
            dispatch_start = time.perf_counter()
            self._pool, self._last, decoded = self.steps.decode(
                self._pool, self._last, *_narrow(decode, width)
            )
        self.dispatch_s += time.perf_counter() - dispatch_start
        self.decode_steps += bool(decoding)
        self.calls += 1
        rows = self._sched.rows
        for i in decoding:
            rows[i].cached += 1
            rows[i].dispatched += 1
        first = []  # rows whose context is now all in the cache: their next token was sampled
        for i in prefilling:
            rows[i].cached += pieces[i]
            if not rows[i].prefilling:
                rows[i].dispatched += 1
                first.append((i, rows[i], finals[i]))
        stepped = [(i, rows[i], j) for j, i in enumerate(decoding)]
        self._deliver_pending()  # the previous step's, while this one runs
        self._pending = (stepped, decoded, first, prefilled)
        return True

    def _deliver_pending(self) -> bool:
        """Streams the tokens of the dispatched step not yet delivered; False if there is none."""
        if self._pending is None:
            return False
        (stepped, decoded, first, prefilled), self._pending = self._pending, None
        if stepped:
            self._deliver(stepped, decoded)
        if first:
            self._deliver(first, prefilled)
        return True

    def _reap(self) -> None:
        """Cancelled requests leave: rows free their blocks, queued ones drop out."""
        sched = self._sched
        for i in sched.live():
            stream = sched.rows[i].stream
            if stream.cancelled:
                self.cancel_lag = max(self.cancel_lag, self.calls - stream.cancel_step)
                sched.leave(i, Event([], None, CANCELLED))
        for stream in sched.drop_cancelled():
            stream.put(Event([], None, CANCELLED))

    def _cancel_everything(self) -> None:
        self._pending = None
        for i in self._sched.live():
            self._sched.leave(i, Event([], None, CANCELLED))
        for stream in self._sched.drop_waiting():
            stream.put(Event([], None, CANCELLED))

    def _decode_args(self, decoding: list[int], batch: int | None = None) -> tuple[tuple, int]:
        """`inputs.decode_inputs` of rows `decoding` in a compiled batch (default the smallest
        that holds them)."""
        b = self._batch(len(decoding)) if batch is None else batch
        return inputs.decode_inputs(self._sched.rows, decoding, self._tables.table, b)

    def _chunk_args(
        self, prefilling: list[int], pieces: dict[int, int], rows: int | None = None
    ) -> tuple[tuple, int, dict[int, int]]:
        """`inputs.chunk_inputs` of pieces[i] new tokens of each row i of `prefilling`, in
        chunks of C, in a compiled group of `rows` rows (default the fewest that hold them)."""
        table, c = self._tables.table, self.prefill_chunk
        cuts = inputs.chunk_cuts(self._sched.rows, prefilling, pieces, c)
        q = next(n for n in self.chunk_rows if n >= len(cuts)) if rows is None else rows
        return inputs.chunk_inputs(self._sched.rows, cuts, table, c, q)

    def _deliver(self, entries: list[tuple[int, Row, int]], out) -> None:
        """(i, row, j): row (in slot i when dispatched) sampled out.tokens[j]: stream it, or end
        the row. Rows that left since (cancelled, preempted, or ended by the token before) are
        skipped."""
        wait_start = time.perf_counter()
        tokens, experts, weights = _host(out, [row for _, row, _ in entries])
        self.wait_s += time.perf_counter() - wait_start
        for i, row, j in entries:
            if self._sched.rows[i] is not row:
                continue
            token, request = int(tokens[j]), row.request
            finish = None
            if token == self.eos_id and not request.ignore_eos:
                finish, new = EOS, []
            elif token in request.stop_ids:
                finish, new = STOP, []
            else:
                new = [token]
                row.generated.append(token)
                if len(row.generated) >= request.max_tokens:
                    finish = LENGTH
            routing = None
            if request.routing:
                routing = [_trace(experts[:, j], weights[:, j])] if new else []
            self.generated_tokens += len(new)
            event = Event(new, routing, finish)
            if finish is not None:
                self._sched.leave(i, event)
            else:
                row.stream.put(event)


def default_prefill_budget(max_batch: int, prefill_chunk: int) -> int:
    """4 x C, lowered (to whole chunks, C at least) so that a full decode batch and a full
    prefill group stay within the grouped decode kernel's MAX_GROUPED_TOKENS: past it the fused
    call's experts take the grouped matmul over each layer's sliced weights, slower and with a
    copy of several layers' experts (H200, 8x7B, 256 rows + 4 x 128 prompt tokens: 30 GiB of
    temporaries, which a pool sized to the free memory left no room for)."""
    room = (MAX_GROUPED_TOKENS - max_batch) // prefill_chunk
    return prefill_chunk * max(1, min(4, room))


def _powers_of_4(top: int) -> list[int]:
    """1, 4, 16, ... below `top`, and `top`: the default compiled sizes (decode batches,
    prefill group rows): a few compiles, at most 4x the rows needed."""
    sizes = [4**n for n in range(top.bit_length()) if 4**n < top]
    return [*sizes, top]


def _narrow(args: tuple, width: int) -> tuple:
    """Step inputs (tokens, block_table, ...) with the table cut to `width` entries."""
    return (args[0], args[1][:, :width], *args[2:])


def _trace(experts: np.ndarray, weights: np.ndarray) -> list:
    """[L, k] experts and weights -> [L][k] (expert id, gate weight) pairs."""
    return [
        [(int(e), float(w)) for e, w in zip(layer_e, layer_w)]
        for layer_e, layer_w in zip(experts, weights)
    ]


def _host(out, rows: list[Row]):
    """(tokens, experts, weights) of a StepOutput on the host; routing only if a row asks."""
    tokens = np.asarray(out.tokens)
    if any(r.request.routing for r in rows):
        return tokens, np.asarray(out.experts), np.asarray(out.weights)
    return tokens, None, None
