"""Training on a device mesh (8 fake CPU devices): the same losses and weights as on one device,
parameters and optimizer moments sharded by the rules table, exact resume on the mesh."""

import json
import os
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.checkpoint.train import TrainCheckpointer
from mixtral_jax.config import ConfigError
from mixtral_jax.parallel import sharding
from mixtral_jax.train import trainer
from mixtral_jax.train.config import TrainConfig, load_run_config
from mixtral_jax.train.step import (
    make_optimizer,
    make_train_step,
    split_micro_batches,
    state_shardings,
)

SMALL = [
    "model.num_layers=2",
    "model.num_experts=4",
    "train.batch_size=8",
    "train.seq_len=32",
    "data.vocab_size=128",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.warmup_steps=1",
    "checkpoint.async_save=false",
]


def _overrides(run_dir, steps, mesh=(), extra=()) -> list[str]:
    return [
        f"checkpoint.dir={run_dir}",
        f"train.steps={steps}",
        *SMALL,
        *[f"mesh.{m}" for m in mesh],
        *extra,
    ]


def _config(run_dir, steps, mesh=(), extra=()):
    return load_run_config(None, _overrides(run_dir, steps, mesh, extra))


def _params(run_dir) -> dict:
    ckpt = TrainCheckpointer(str(run_dir), keep=3, async_save=False)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    state = ckpt.manager.restore(ckpt.steps()[-1], args=args)["state"]
    ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


# The resume test's first step trains at the full lr (no warmup), so weights drawn afresh at
# the resume instead of restored would not match. eps 1e-3: with the default 1e-8, AdamW's
# first step is about lr * sign(g), which turns float rounding in near-zero gradients into
# lr-sized differences between the mesh and one device.
NO_WARMUP = ("train.warmup_steps=0", "train.eps=1e-3")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = trainer.run(_config(run_dir, 2, extra=NO_WARMUP), show_progress=False)
    return result, _params(run_dir)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_py(run_dir, steps, mesh, extra) -> subprocess.CompletedProcess:
    """train.py, in a process of its own, on the same run config as `_config`."""
    overrides = _overrides(run_dir, steps, mesh, extra)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *[f"--{o}" for o in overrides]],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def _stopped_and_resumed_on_mesh(run_dir, mesh) -> subprocess.CompletedProcess:
    """train.py to step 1, then the same command to step 2 (a resume): the failing run's
    process, else the second one's."""
    for steps in (1, 2):
        proc = _train_py(run_dir, steps, mesh, NO_WARMUP)
        if proc.returncode != 0:
            return proc
    return proc


def _last_loss(run_dir) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r][-1]["loss"]


def test_mesh_run_with_a_resume_equals_the_single_device_run(tmp_path, single):
    """data x fsdp x expert (every parameter split somewhere; the MoE dispatches by all-to-all),
    stopped after step 1 and resumed, through train.py: loss and every weight equal the
    uninterrupted single-device run. (Other meshes: forward and gradients in test_sharding.)

    The mesh runs are subprocesses: an abort inside XLA:CPU then shows its own message (a
    pytest worker's captured stderr dies with it). XLA:CPU's 8 host-platform devices have
    aborted here about once in a few full-suite runs on two cores, never in 60 runs of this
    test alone; an abort (SIGABRT) is run once more in a fresh directory, with a warning that
    quotes XLA's message. Any other failure, a second abort or a mismatch fails the test."""
    result_1, params_1 = single
    mesh = ("data=2", "fsdp=2", "expert=2")
    run_dir = tmp_path / "mesh"
    proc = _stopped_and_resumed_on_mesh(run_dir, mesh)
    if proc.returncode == -signal.SIGABRT:
        fatal = [line for line in proc.stderr.splitlines() if line.startswith("F")]
        warnings.warn(
            f"XLA:CPU aborted a mesh run; run again. {(fatal or [proc.stderr[-500:]])[0][:500]}",
            stacklevel=1,
        )
        run_dir = tmp_path / "mesh_again"
        proc = _stopped_and_resumed_on_mesh(run_dir, mesh)
    assert proc.returncode == 0, f"train.py exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "resumed from step 1" in proc.stdout
    np.testing.assert_allclose(_last_loss(run_dir), result_1["loss"], rtol=1e-5)
    params = _params(run_dir)
    assert params.keys() == params_1.keys()
    for name in params:
        np.testing.assert_allclose(params[name], params_1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_state_is_created_sharded_by_the_rules_table(tmp_path):
    cfg = _config(tmp_path, 1, ("data=2", "fsdp=2", "expert=2"))
    model_cfg, _, batches, _ = trainer._prepare_data(cfg)
    mesh = trainer.make_run_mesh(cfg)
    _, tx, state, ckpt, _ = trainer._init_or_resume(cfg, model_cfg, batches, mesh)
    ckpt.close()
    want = sharding.param_shardings(mj.param_shapes(model_cfg), mesh)
    flat_want = jax.tree.leaves(want)
    for leaf, w in zip(jax.tree.leaves(state.params), flat_want, strict=True):
        assert leaf.sharding.is_equivalent_to(w, leaf.ndim)
    moments = optax.tree_map_params(
        tx, lambda x: x, state.opt_state, transform_non_params=lambda _: None
    )
    adam = [m for m in jax.tree.leaves(moments) if m is not None]
    assert len(adam) == 2 * len(flat_want)  # mu and nu, each sharded like its parameter
    for leaf, w in zip(adam, flat_want * 2):
        assert leaf.sharding.is_equivalent_to(w, leaf.ndim)
    assert any(not leaf.sharding.is_fully_replicated for leaf in adam)


@pytest.mark.parametrize(
    "mesh,message",
    [
        (("data=16",), "needs 16 devices, 8 present"),
        (("data=-1", "expert=-1"), "only one mesh axis may be -1"),
        (("expert=8",), "mesh.expert=8 does not divide num_experts=4"),
        (("data=0",), "mesh.data=0: must be >= 1 or -1"),
    ],
)
def test_bad_mesh_is_a_one_line_error(tmp_path, mesh, message):
    with pytest.raises(ConfigError, match=message):
        trainer.run(_config(tmp_path, 1, mesh), show_progress=False)


def _synthetic_batch(vocab: int, rows: int, seq: int, grad_accum: int) -> dict:
    tokens = np.random.default_rng(0).integers(3, vocab, (rows, seq + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)),
        "segment_ids": np.ones((rows, seq), np.int32),
        "loss_mask": np.ones((rows, seq), np.float32),
    }
    return split_micro_batches(batch, grad_accum)


def _two_steps(mesh):
    """Two train steps of a 1-layer tiny model (2 micro-batches) on `mesh` (a 1x1x1x1 mesh for
    one device): (losses, host params)."""
    cfg = mj.ModelConfig.tiny(num_layers=1, router_jitter_noise=0.1)
    tc = TrainConfig(batch_size=16, seq_len=16, grad_accum=2, warmup_steps=1)
    graphdef = nnx.graphdef(mj.abstract(cfg))
    host = _synthetic_batch(cfg.vocab_size, 16, 16, 2)
    params = mj.init_params(cfg, mesh, 0)
    tx = make_optimizer(tc, params)
    state = trainer._fresh_state(params, tx, 0, mesh)
    where = state_shardings(params, tx, mesh)
    step = make_train_step(graphdef, tx, tc, mesh=mesh, shardings=where)
    batch = trainer._on_mesh(host, mesh, leading=1)
    losses = []
    for _ in range(2):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    # the step kept every parameter and moment where the rules put it
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(where), strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    return losses, [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def two_steps_one_device():
    return _two_steps(sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1]))


@pytest.mark.parametrize("spec", ["fsdp=2,expert=2,tensor=2"])
def test_train_steps_on_meshes_equal_one_device(spec, two_steps_one_device):
    """The step compiled with explicit shardings (FSDP x tensor x expert: every weight split
    three ways; 8 devices cannot hold all four axes > 1) gives one device's losses and
    weights after two AdamW steps with gradient accumulation and router jitter."""
    want_losses, want_params = two_steps_one_device
    losses, params = _two_steps(sharding.make_mesh(sharding.MeshConfig.parse(spec)))
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for a, b in zip(params, want_params, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
