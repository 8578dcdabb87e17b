"""bench/update_passes.py's HLO accounting on CPU: the guarded update's state traffic is split
into before the conditional and inside its branch, and the select form (the guard before) is
seen to write its update outside any branch and to select it against the old state."""

import jax
import jax.numpy as jnp

from bench import update_passes
from mixtral_jax.train.config import TrainConfig


def _summaries():
    params = {
        "a": jax.ShapeDtypeStruct((64, 48), jnp.float32),
        "b": jax.ShapeDtypeStruct((48, 80), jnp.float32),
    }
    tc = TrainConfig(warmup_steps=0)
    return [
        update_passes.summarize(update_passes.guard_hlo(params, tc, guard), params)
        for guard in (update_passes.select_guard, update_passes.guarded_update)
    ]


def test_guarded_update_reads_the_state_before_its_cond_and_writes_it_in_the_branch():
    before, now = _summaries()
    assert (before["conditionals"], now["conditionals"]) == (0, 1)
    assert before["selects"] >= 6 and now["selects"] == 0 and now["copies"] == 0
    # before the cond: the norm's read of g (on the CPU its squares are written too) and the
    # predicate's read of g, mu, nu, p (4 passes), writing booleans (6.25 passes read with
    # XLA:CPU's MLIR fusion emitters, 7.25 with the elemental ones conftest.py picks: one more
    # read of a square); the select form writes its update (p, mu, nu) and then the select's
    # outputs there
    assert 5 <= now["entry_read"] <= 8 and now["entry_written"] <= 1.25
    assert before["entry_written"] >= 6 and before["branch_read"] == 0
    # the applied update writes p, mu, nu (3 passes) at least, in the branch
    assert now["branch_written"] >= 3
