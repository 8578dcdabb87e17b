"""The server's Prometheus series: engine gauges at scrape time, histograms, tokens/s window."""

from prometheus_client.parser import text_string_to_metric_families

from mixtral_jax.serve.metrics import Metrics


def _samples(metrics: Metrics) -> dict:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gauges_histograms_and_tokens_per_second():
    stats = {"queue_depth": 3, "running": 5, "free_blocks": 7, "total_blocks": 9, "steps": 1}
    m = Metrics(lambda: stats, window_s=10.0)
    m.requests.labels("chat", "200").inc()
    m.ttft.observe(0.3)
    m.itl.observe(0.02)
    t0 = m._start
    m.tokens(40, now=t0 + 1)
    m.tokens(60, now=t0 + 15)
    s = _samples(m)
    assert (
        s[("mixtral_jax_engine_queue_depth", ())] == 3
        and s[("mixtral_jax_engine_running", ())] == 5
    )
    assert (
        s[("mixtral_jax_engine_free_blocks", ())] == 7
        and s[("mixtral_jax_engine_total_blocks", ())] == 9
    )
    assert s[("mixtral_jax_engine_steps", ())] == 1
    assert s[("mixtral_jax_requests_total", (("endpoint", "chat"), ("status", "200")))] == 1
    assert s[("mixtral_jax_output_tokens_total", ())] == 100
    assert s[("mixtral_jax_time_to_first_token_seconds_count", ())] == 1
    assert s[("mixtral_jax_time_to_first_token_seconds_bucket", (("le", "0.5"),))] == 1
    assert s[("mixtral_jax_time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 0
    assert s[("mixtral_jax_inter_token_latency_seconds_count", ())] == 1
    # the window holds the last 10 s: at t0 + 16 only the 60 tokens of t0 + 15
    assert m.tokens_per_second(now=t0 + 16) == 6.0
    stats["queue_depth"] = 0  # read again at the next scrape
    assert _samples(m)[("mixtral_jax_engine_queue_depth", ())] == 0
    assert Metrics(dict).render()  # a second registry: no duplicate series
