"""An engine without a model, for measuring the HTTP layer alone (`bench/serve.py --fake-engine`).

It has the interface `serve.app` uses (submit, stats, start, shutdown, max_context) and streams
one token per running request every `step_s` seconds (0: as fast as its thread goes), with the
real engine's `Stream`s and events, so the server's and the client's own cost per streamed
token is what limits the rate: the ceiling the model's serving figures can reach through HTTP.
Tokens are ids drawn from [3, vocab); requests end at max_tokens (ignore_eos or not) or when
cancelled.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from mixtral_jax.serve.engine import EngineClosed, QueueFull
from mixtral_jax.serve.rows import CANCELLED, LENGTH, Event, Stream


class FakeEngine:
    def __init__(self, *, max_batch: int, max_queue: int, max_context: int, vocab: int, step_s):
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.vocab, self.step_s = vocab, step_s
        self._running: list[tuple[Stream, list[int]]] = []
        self._waiting: list[Stream] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.generated_tokens = self.steps = 0
        self._rng = np.random.default_rng(0)

    def submit(self, request) -> Stream:
        stream = Stream(request, self._wake)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is shutting down and admits no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full: {self.max_queue} requests are waiting")
            self._waiting.append(stream)
            self._cond.notify_all()
        return stream

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> dict:
        return {
            "queue_depth": len(self._waiting),
            "running": len(self._running),
            "generated_tokens": self.generated_tokens,
            "steps": self.steps,
            "traces": 0,
        }

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    def shutdown(self, cancel: bool = True, timeout: float | None = None) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for stream, _ in self._running:
            stream.put(Event([], None, CANCELLED))
        for stream in self._waiting:
            stream.put(Event([], None, CANCELLED))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._running or self._waiting or self._closed):
                    self._cond.wait()
                if self._closed:
                    return
                while self._waiting and len(self._running) < self.max_batch:
                    self._running.append((self._waiting.pop(0), []))
            start = time.perf_counter()
            self._step()
            rest = self.step_s - (time.perf_counter() - start)
            if rest > 0:
                time.sleep(rest)

    def _step(self) -> None:
        tokens = self._rng.integers(3, self.vocab, len(self._running))
        kept = []
        for (stream, generated), token in zip(self._running, tokens):
            if stream.cancelled:
                stream.put(Event([], None, CANCELLED))
                continue
            generated.append(int(token))
            self.generated_tokens += 1
            done = len(generated) >= stream.request.max_tokens
            stream.put(Event([int(token)], None, LENGTH if done else None))
            if not done:
                kept.append((stream, generated))
        self._running = kept
        self.steps += 1
