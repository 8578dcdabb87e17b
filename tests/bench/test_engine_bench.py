"""bench/engine.py's logic on CPU: how a step's routing spread over the experts is counted, and a
tiny run's step costs with both kinds of last tokens."""

import numpy as np

from bench import engine as engine_bench


def test_expert_load_counts_the_experts_used_and_the_busiest_one():
    # 2 layers, 4 rows, k 2, 4 experts: layer 0 balanced (each expert 2 rows), layer 1 all
    # rows on experts 0 and 1 (4 rows each: 2x the mean of 2)
    experts = np.array(
        [
            [[0, 1], [2, 3], [0, 2], [1, 3], [9, 9]],  # a 5th, idle row is not counted
            [[0, 1], [1, 0], [0, 1], [1, 0], [9, 9]],
        ]
    )
    load = engine_bench.expert_load(experts, rows=4, num_experts=4)
    assert load == {"experts_used": 3.0, "rows_max_over_mean": 1.5}


def test_a_tiny_run_times_the_step_with_fed_back_and_random_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    payload = engine_bench.main(["--preset", "tiny", "--batches", "4", "--one-batch"])
    row = payload["decode"][0]
    assert row["batch"] == 4 and row["output_tokens_per_s"] > 0
    assert row["decode_step_ms"] > 0 and row["decode_step_random_tokens_ms"] > 0
    for routing in (row["routing"], row["routing_random_tokens"]):
        assert 1 <= routing["experts_used"] <= 4  # tiny: 4 experts, top-2
        assert 1 <= routing["rows_max_over_mean"] <= 4 / 2  # an expert takes each row once
    assert (tmp_path / "engine_b4.json").exists()
