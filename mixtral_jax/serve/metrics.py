"""Prometheus metrics of the server (prometheus-client), served at GET /metrics.

Counters and histograms are kept as requests run (time to first token and inter-token latency
as the HTTP layer sees them: from the request's arrival, between token events); gauges of the
engine (`mixtral_jax_engine_<key>` for every number of `Engine.stats()`: queue depth, running
sequences, KV blocks, ...) are read at each scrape, and output tokens/s is the count of the last
`window_s` seconds. Every app has its own registry, so several servers in one process (tests) do
not share series.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "mixtral_jax"
# Seconds: 1 ms .. 60 s (a first token may wait behind a long prefill).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)
# Help texts of Engine.stats() keys; every numeric key is exported as a gauge.
ENGINE_GAUGES = {
    "queue_depth": "requests waiting for a batch row",
    "running": "sequences in the running batch",
    "free_blocks": "free KV cache blocks",
    "total_blocks": "KV cache blocks in all",
    "generated_tokens": "tokens the engine generated since it started",
    "steps": "decode steps since the engine started",
    "calls": "model calls (steps, with or without a prefill group) since the engine started",
    "prefill_tokens": "prompt tokens prefilled since the engine started (recomputed included)",
    "preemptions": "rows preempted for lack of KV blocks (recomputed later)",
    "cancel_lag": "the most model calls a cancelled row ran after its cancel before it left",
}


class _EngineCollector:
    """Gauges read at scrape time: the engine's stats and the recent output tokens/s."""

    def __init__(self, stats: Callable[[], dict], tokens_per_s: Callable[[], float]):
        self._stats, self._tokens_per_s = stats, tokens_per_s

    def collect(self):
        for key, value in self._stats().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                help_text = ENGINE_GAUGES.get(key, f"the engine's {key}")
                yield GaugeMetricFamily(f"{PREFIX}_engine_{key}", help_text, value=float(value))
        yield GaugeMetricFamily(
            f"{PREFIX}_output_tokens_per_second",
            "output tokens per second over the last seconds",
            value=self._tokens_per_s(),
        )


class Metrics:
    """The server's series, in their own registry.

    Args:
      stats: returns the engine's stats (`Engine.stats()`).
      window_s: seconds over which output tokens/s is counted.
    """

    def __init__(self, stats: Callable[[], dict], window_s: float = 10.0):
        self.registry = CollectorRegistry()
        self.window_s = window_s
        self._recent: collections.deque = collections.deque()  # (time, tokens)
        self._lock = threading.Lock()
        self._start = time.monotonic()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "finished HTTP requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens", registry=r)
        self.output_tokens = Counter(f"{PREFIX}_output_tokens", "generated tokens", registry=r)
        self.finished = Counter(
            f"{PREFIX}_finished", "finished completions by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "request arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "time between consecutive tokens of a request",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "request arrival to its last token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(stats, self.tokens_per_second))

    def tokens(self, n: int, now: float | None = None) -> None:
        """Counts n output tokens (for the counter and the tokens/s window)."""
        if n <= 0:
            return
        self.output_tokens.inc(n)
        with self._lock:
            self._recent.append((time.monotonic() if now is None else now, n))

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            total = sum(n for _, n in self._recent)
        return total / max(min(self.window_s, now - self._start), 1e-3)

    def render(self) -> bytes:
        """The exposition text of every series."""
        return generate_latest(self.registry)
