"""bench/train_parts.py's accounting on CPU: a part's floor is the larger of its FLOP and byte
floors, shares count how often a step runs the part, and the forward + backward timer runs a
real vjp of the differentiated arguments only."""

import jax.numpy as jnp

from bench import train_parts


def test_floor_is_the_larger_of_flops_and_bytes_and_shares_count_repeats(capsys):
    table = train_parts.Table(tflops=100.0, tbs=2.0)
    table.add("matmul", 0.004, flops=2e11, nbytes=1e9)  # 2 ms of FLOPs, 0.5 ms of bytes
    table.add("copy", 0.001, flops=1e9, nbytes=1e9, per=3)  # 0.01 ms vs 0.5 ms
    table.print(step_ms=10.0)
    matmul, copy = table.rows
    assert (matmul["floor_ms"], matmul["basis"]) == (2.0, "flops")
    assert (copy["floor_ms"], copy["basis"]) == (0.5, "bytes")
    assert abs(matmul["share"] - 0.4) < 1e-9 and abs(copy["share"] - 0.3) < 1e-9
    assert "copy" in capsys.readouterr().out


def test_forward_and_backward_timer_differentiates_only_the_listed_arguments():
    x, n = jnp.ones((4, 8)), jnp.arange(4)  # n: integer, not differentiated
    fwd_s, both_s = train_parts.fwd_and_fwd_bwd(
        lambda x, n: x * n[:, None].astype(x.dtype), (x, n), (0,), repeats=1
    )
    assert fwd_s > 0 and both_s > 0
