"""bench/serve.py's figures from chunk timings (the GPU run's arithmetic, checked by hand)."""

import pytest

from bench.serve import summarize


def test_summarize_counts_tokens_ttft_and_inter_token_gaps():
    results = [
        # start 0: tokens at 1.0 (1), 1.5 (1), 2.5 (2: two gaps of 0.5)
        {"start": 0.0, "stamps": [(1.0, 1), (1.5, 1), (2.5, 2)], "error": None},
        {"start": 1.0, "stamps": [(1.2, 1), (1.3, 1)], "error": None},
        {"start": 2.0, "stamps": [], "error": "503"},
    ]
    row = summarize(results, wall_s=4.0, concurrency=2)
    assert row["output_tokens"] == 6 and row["output_tokens_per_s"] == 1.5
    assert row["error_count"] == 1 and row["errors"] == ["503"] and row["requests"] == 3
    assert row["ttft_p50_s"] == pytest.approx(0.6)  # of 1.0 and 0.2
    assert row["itl_p50_s"] == pytest.approx(0.5)  # gaps 0.5, 0.5, 0.5, 0.1
    assert row["itl_p99_s"] == pytest.approx(0.5)
    assert row["itl_p99_over_p50"] == pytest.approx(1.0)
