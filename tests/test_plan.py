"""Planner: the analytic per-device parameter/optimizer bytes match what XLA compiled."""

import mixtral_jax as mj
from mixtral_jax import plan
from mixtral_jax.parallel import sharding as sh


def test_plan_matches_compiled_arguments():
    cfg = mj.ModelConfig.tiny()
    result = plan.plan(cfg, sh.MeshConfig.parse("expert=4,data=2"), batch=8, seq=16)
    # arguments = params + two moments + the int32 token shard [B/8, T]
    assert result.compiled_arguments == result.params + result.optimizer + (8 // 8) * 16 * 4
    assert result.compiled_temp > 0
    # a sharded table holds less than the whole model on each device
    whole = sum(
        x.size * 4 for x in __import__("jax").tree_util.tree_leaves(mj.get_params(mj.abstract(cfg)))
    )
    assert result.params < whole


def test_plan_cli_bad_mesh_is_one_line(capsys):
    assert plan.main(["--mesh", "data=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "uses 3 devices, but 8 are present" in err


def test_plan_cli_prints(capsys):
    assert plan.main(["--mesh", "fsdp=4,tensor=2", "--batch", "8", "--seq", "8"]) == 0
    assert "activations" in capsys.readouterr().out
