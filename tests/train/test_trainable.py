"""Training part of the model: the frozen rest is bit-identical after training and has no
optimizer state (counted in leaves and bytes); a LoRA run saves its adapters alone and resumes
after kill -9 bit for bit; patterns select what they name, and a bad one is a one-line error."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.checkpoint.adapters import load_adapters
from mixtral_jax.config import ConfigError
from mixtral_jax.model.params import init_params, param_shapes
from mixtral_jax.train import trainable, trainer
from mixtral_jax.train.config import load_run_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import ROOT, _complete_steps, _final_state, _kill_when

SMALL = [
    "model.num_layers=1",
    "train.batch_size=2",
    "train.seq_len=16",
    "data.vocab_size=128",
    "data.eval_fraction=0.0",
    "train.log_every=1",
    "train.warmup_steps=0",
    "train.lr=1e-2",
    "checkpoint.save_every=1",
    "checkpoint.keep=5",
]
LORA = ["train.lora_rank=4", 'train.lora_targets=["q_proj","o_proj","router","w_gate","w_down"]']


def _run(run_dir, *overrides):
    cfg = load_run_config(None, [f"checkpoint.dir={run_dir}", *SMALL, *overrides])
    return trainer.run(cfg, show_progress=False)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in map(np.asarray, jax.tree.leaves(tree)))


def _moments(opt_state) -> list:
    """The AdamW moments (mu and nu trees) of a saved optimizer state."""
    found = []

    def visit(node):
        if isinstance(node, dict):
            for k, v in node.items():
                (found.append(v) if k in ("mu", "nu") else visit(v))
        elif isinstance(node, list | tuple):
            for v in node:
                visit(v)

    visit(opt_state)
    return found


def test_expert_only_training_keeps_the_rest_bit_identical_and_out_of_the_optimizer(tmp_path):
    _run(tmp_path, "train.steps=2", 'train.trainable=["layers.*.moe.experts[1]", "lm_head"]')
    cfg, final = mj.checkpoint.load_model(str(tmp_path / "model"))
    mesh = trainer.make_run_mesh(load_run_config(None, []))  # the run's 1x1x1x1 mesh
    start = jax.device_get(init_params(cfg, mesh, 0))  # what the run started from (seed 0)
    for name in ("w_gate", "w_up", "w_down"):
        got, want = final["layers"]["moe"][name], start["layers"]["moe"][name]
        assert not np.array_equal(got[:, 1], want[:, 1])  # expert 1 trained, in every layer
        np.testing.assert_array_equal(np.delete(got, 1, axis=1), np.delete(want, 1, axis=1))
    assert not np.array_equal(final["lm_head"], start["lm_head"])
    rest = lambda p: {k: v for k, v in p.items() if k != "lm_head"}
    rest_final, rest_start = rest(final), rest(start)
    for tree in (rest_final, rest_start):
        tree["layers"] = dict(tree["layers"], moe={"router": tree["layers"]["moe"]["router"]})
    jax.tree.map(np.testing.assert_array_equal, rest_final, rest_start)

    _, state = _final_state(tmp_path)
    e_d_f = cfg.embed_dim * cfg.hidden_dim
    trained = cfg.num_layers * 3 * e_d_f * 4 + cfg.embed_dim * cfg.vocab_size * 4  # float32
    assert _nbytes(state["params"]) == trained
    mu, nu = _moments(state["opt_state"])
    assert len(jax.tree.leaves(mu)) == len(jax.tree.leaves(nu)) == 4  # 3 expert slices, lm_head
    assert _nbytes(mu) == _nbytes(nu) == trained
    assert _nbytes(state["opt_state"]) < 2 * trained + 64  # + step counters
    assert _nbytes(state["opt_state"]) < _nbytes(start)  # full fine-tuning: 2x the model


def _lora_cmd(run_dir, steps):
    overrides = [*SMALL, *LORA, f"train.steps={steps}", f"checkpoint.dir={run_dir}"]
    return [sys.executable, os.path.join(ROOT, "train.py"), *(f"--{o}" for o in overrides)]


@pytest.mark.slow
def test_lora_run_saves_adapters_alone_and_resumes_after_kill_9_bit_identically(tmp_path):
    steps, run_dir = 3, tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "1.log", "w") as log:
        proc = subprocess.Popen(
            _lora_cmd(run_dir, steps), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    _kill_when(proc, lambda: bool(_complete_steps(run_dir)), "checkpoint")
    resumed = _complete_steps(run_dir)[-1]
    assert resumed < steps
    done = subprocess.run(
        _lora_cmd(run_dir, steps), capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"resumed from step {resumed} of {run_dir}" in done.stdout

    _run(tmp_path / "ref", *LORA, f"train.steps={steps}")
    step, state = _final_state(run_dir)
    ref_step, ref = _final_state(tmp_path / "ref")
    assert step == ref_step == steps
    jax.tree.map(np.testing.assert_array_equal, state, ref)

    # the state holds the adapters alone (their moments, no base); so does the final model
    lcfg, adapters = load_adapters(str(run_dir / "model"))
    assert lcfg.rank == 4 and lcfg.targets == ("q_proj", "o_proj", "router", "w_gate", "w_down")
    jax.tree.map(np.testing.assert_array_equal, adapters, state["params"])
    mu, nu = _moments(state["opt_state"])
    assert _nbytes(mu) == _nbytes(nu) == _nbytes(adapters)
    assert len(jax.tree.leaves(mu)) == 2 * len(lcfg.targets)
    assert sorted(os.listdir(run_dir / "model")) == ["adapters.json", "adapters.npz"]
    assert all(np.any(np.asarray(b) != 0) for b in jax.tree.leaves(adapters)[1::2])  # B trained


def test_patterns_select_the_slices_they_name():
    shapes = param_shapes(mj.ModelConfig.tiny(num_layers=3, num_experts=4))
    rows = trainable.select(shapes, ("layers.*.moe.experts[2]", "layers.1.moe.router"))
    expert_rows = np.array([2, 6, 10])  # (layer, expert) -> layer * E + expert
    for name in ("w_gate", "w_up", "w_down"):
        np.testing.assert_array_equal(rows[("layers", "moe", name)], expert_rows)
    np.testing.assert_array_equal(rows[("layers", "moe", "router")], [1])
    assert len(rows) == 4
    whole = trainable.select(shapes, ("layers.*.attn", "embed"))
    assert whole[("embed", "embedding")] is None and whole[("layers", "attn", "q_proj")] is None
    assert len(whole) == 5


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ['train.trainable=["layers.*.moe.experts[7]"]'],
            "'layers.*.moe.experts[7]' selects nothing",
        ),
        (["train.lora_rank=-2"], "train.lora_rank=-2: must be an integer >= 0"),
        (["train.lora_rank=4", 'train.lora_targets=["mlp"]'], "'mlp' is no LoRA target"),
        (["train.lora_rank=4", 'train.trainable=["embed"]'], "cannot go with train.lora_rank=4"),
        (["train.lora_rank=40", 'train.lora_targets=["router"]'], "exceeds router's smaller side"),
    ],
)
def test_bad_trainable_and_lora_settings_are_one_line_errors(overrides, message):
    def start():
        cfg = load_run_config(None, overrides)
        trainable.partition(cfg.train, cfg.model)

    with pytest.raises(ConfigError) as e:
        start()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resuming_a_partial_run_over_another_base_is_refused():
    cfg = load_run_config(None, ["checkpoint.init_from=runs/b/model", "train.lora_rank=2"])
    trainable.check_same_base({"checkpoint": {"init_from": "runs/b/model"}}, cfg, 3)
    with pytest.raises(ConfigError) as e:
        trainable.check_same_base({"checkpoint": {"init_from": "runs/a/model"}}, cfg, 3)
    assert "step 3 of this run trained over the frozen weights of 'runs/a/model'" in str(e.value)
