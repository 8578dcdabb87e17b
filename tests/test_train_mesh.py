"""Training on a device mesh (8 fake CPU devices): the same losses and weights as on one device,
parameters and optimizer moments sharded by the rules table, exact resume on the mesh."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mixtral_jax import sharding, trainer
from mixtral_jax.config import ConfigError
from mixtral_jax.runconfig import load_run_config
from mixtral_jax.train_checkpoint import TrainCheckpointer

SMALL = ["model.num_layers=2", "model.num_experts=4", "train.batch_size=8", "train.seq_len=32",
         "data.vocab_size=128", "train.log_every=1", "train.eval_every=1000",
         "train.warmup_steps=1", "checkpoint.async_save=false"]


def _config(run_dir, steps, mesh=(), extra=()):
    return load_run_config(None, [f"checkpoint.dir={run_dir}", f"train.steps={steps}", *SMALL,
                                  *[f"mesh.{m}" for m in mesh], *extra])


def _params(run_dir) -> dict:
    ckpt = TrainCheckpointer(str(run_dir), keep=3, async_save=False)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    state = ckpt.manager.restore(ckpt.steps()[-1], args=args)["state"]
    ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = trainer.run(_config(run_dir, 2), show_progress=False)
    return result, _params(run_dir)


def test_mesh_run_with_a_resume_equals_the_single_device_run(tmp_path, single):
    """data x fsdp x expert (every parameter split somewhere; the MoE dispatches by all-to-all),
    stopped after step 1 and resumed: loss and every weight equal the uninterrupted
    single-device run. (Other meshes: forward and gradients in test_sharding.)"""
    result_1, params_1 = single
    mesh = ("data=2", "fsdp=2", "expert=2")
    trainer.run(_config(tmp_path, 1, mesh), show_progress=False)
    result = trainer.run(_config(tmp_path, 2, mesh), show_progress=False)  # resumes at 1
    assert result["step"] == 2
    np.testing.assert_allclose(result["loss"], result_1["loss"], rtol=1e-5)
    params = _params(tmp_path)
    assert params.keys() == params_1.keys()
    for name in params:
        np.testing.assert_allclose(params[name], params_1[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_state_is_created_sharded_by_the_rules_table(tmp_path):
    cfg = _config(tmp_path, 1, ("data=2", "fsdp=2", "expert=2"))
    model_cfg, _, batches, _ = trainer._prepare_data(cfg)
    mesh = trainer.make_run_mesh(cfg)
    _, tx, state, ckpt = trainer._init_or_resume(cfg, model_cfg, batches, mesh)
    ckpt.close()
    want = sharding.param_shardings(model_cfg, mesh)
    flat_want = jax.tree.leaves(want)
    for leaf, w in zip(jax.tree.leaves(state.params), flat_want, strict=True):
        assert leaf.sharding.is_equivalent_to(w, leaf.ndim)
    moments = optax.tree_map_params(tx, lambda x: x, state.opt_state,
                                    transform_non_params=lambda _: None)
    adam = [m for m in jax.tree.leaves(moments) if m is not None]
    assert len(adam) == 2 * len(flat_want)  # mu and nu, each sharded like its parameter
    for leaf, w in zip(adam, flat_want * 2):
        assert leaf.sharding.is_equivalent_to(w, leaf.ndim)
    assert any(not leaf.sharding.is_fully_replicated for leaf in adam)


@pytest.mark.parametrize("mesh,message", [
    (("data=16",), "needs 16 devices, 8 present"),
    (("data=-1", "expert=-1"), "only one mesh axis may be -1"),
    (("expert=8",), "mesh.expert=8 does not divide num_experts=4"),
    (("data=0",), "mesh.data=0: must be >= 1 or -1"),
])
def test_bad_mesh_is_a_one_line_error(tmp_path, mesh, message):
    with pytest.raises(ConfigError, match=message):
        trainer.run(_config(tmp_path, 1, mesh), show_progress=False)
