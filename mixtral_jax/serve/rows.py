"""What the engine hands out and keeps per request: Request, Event, Stream, and a batch row.

`Request` and `Event` are the engine's interface (the HTTP layer builds one and relays the
other); `Stream` is the thread-safe handle `Engine.submit` returns; `Row` is the engine thread's
own bookkeeping of a request holding a row of the batch.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from mixtral_jax.generate.sampling import SamplingParams

GREEDY = SamplingParams()
# Why a stream ended.
EOS, LENGTH, STOP, CANCELLED, ERROR = "eos", "length", "stop", "cancelled", "error"


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
      prompt: token ids, BOS included by the caller.
      max_tokens: new tokens at most.
      sampling: temperature / top-k / top-p (greedy by default).
      seed: this request's PRNG seed in [0, 2**32): the same seed and prompt give the same
        tokens whatever else the batch holds.
      routing: return, per new token, every layer's chosen experts and gate weights.
      stop_ids: extra token ids that end the request ('stop'; the id itself is not returned).
      ignore_eos: do not stop at EOS (benchmarks of fixed lengths).
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    seed: int = 0
    routing: bool = False
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class Event:
    """What a stream yields, in order.

    Attributes:
      tokens: new token ids since the previous event (may be empty on finish).
      routing: with `Request.routing`, one entry per new token: [L][k] (expert id, gate weight)
        pairs, the routing of the position whose logits chose that token; else None.
      finish: None while running; 'eos' | 'length' | 'stop' | 'cancelled' | 'error' on the last.
      error: what went wrong, with finish 'error'.
    """

    tokens: list[int]
    routing: list | None
    finish: str | None
    error: str | None = None


class Stream:
    """The handle of a submitted request; safe to use from any thread.

    Attributes:
      id: unique request id.
      prompt_tokens: the prompt's length.
      submitted: time.monotonic() at submit; first_token_at, finished_at: when those happened
        (None until then), for metrics.
      cancel_step: the engine's step count (`clock`) when cancel() was first called, else None.
      failures: failed engine steps it held a row in (the engine recomputes it `MAX_RETRIES`
        times, then ends it with 'error').
    """

    def __init__(
        self, request: Request, wake: Callable[[], None], clock: Callable[[], int] = lambda: 0
    ):
        self.id = uuid.uuid4().hex
        self.request = request
        self.prompt_tokens = len(request.prompt)
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish: str | None = None
        self._events: queue.Queue[Event] = queue.Queue()
        self._cancel = threading.Event()
        self._wake, self._clock = wake, clock
        self.cancel_step: int | None = None
        self.failures = 0
        self._listener: Callable[[], None] | None = None

    def listen(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` (on the engine thread) after each event is delivered, and once now
        if some already wait: how an event loop learns of events without a thread blocked in
        `get` per stream."""
        self._listener = listener
        if not self._events.empty():
            listener()

    def get(self, timeout: float | None = None) -> Event:
        """The next event, blocking; raises queue.Empty after `timeout` seconds."""
        return self._events.get(timeout=timeout)

    def __iter__(self) -> Iterator[Event]:
        """Every event up to and including the one with `finish` set."""
        while True:
            event = self.get()
            yield event
            if event.finish is not None:
                return

    def cancel(self) -> None:
        """Ends the request: its row and KV blocks are freed before the next decode step, and
        the stream then yields finish='cancelled' (a no-op once finished)."""
        if self.cancel_step is None:
            self.cancel_step = self._clock()
        self._cancel.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def put(self, event: Event) -> None:
        """(Engine thread) delivers an event; the first with tokens stamps first_token_at."""
        now = time.monotonic()
        if event.tokens and self.first_token_at is None:
            self.first_token_at = now
        if event.finish is not None:
            self.finish, self.finished_at = event.finish, now
        self._events.put(event)
        if self._listener is not None:
            self._listener()


@dataclasses.dataclass
class Row:
    """(Engine thread) a request holding a row of the batch, or preempted and waiting to be
    recomputed (its KV blocks went back to the pool; what it generated stays).

    Attributes:
      stream: its stream (request at stream.request).
      order: admission order, kept through preemption: older rows are scheduled (prefilled,
        given blocks) first, and the youngest is preempted first.
      context: the tokens to prefill: the prompt, or after a preemption the prompt and every
        token generated before it (recomputed; the next token is sampled after them).
      cached: tokens in the cache once the steps dispatched so far have run (the next
        token's absolute index and RoPE position).
      dispatched: tokens whose sampling has been dispatched (the next one's sampling counter);
        the last of them lives on the device until its step is delivered.
      generated: tokens returned so far.
    """

    stream: Stream
    order: int
    context: list[int]
    cached: int = 0
    dispatched: int = 0
    generated: list[int] = dataclasses.field(default_factory=list)

    @property
    def request(self) -> Request:
        return self.stream.request

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.context)

    @property
    def sampled_all(self) -> bool:
        """Every token it may generate has been dispatched: it waits for its last delivery."""
        return self.dispatched >= self.request.max_tokens

    def evict(self) -> None:
        """Preempted: nothing cached; the prompt and what it generated are prefilled again."""
        self.context = [*self.request.prompt, *self.generated]
        self.cached, self.dispatched = 0, len(self.generated)  # a pending token is resampled
