"""A run never saves garbage, never strands itself, refuses a changed resume, and turns bad
input into one line: each test fails on the behaviour it names."""

import errno
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging

import mixtral_jax as mj
from mixtral_jax.checkpoint.train import TrainCheckpointer
from mixtral_jax.config import ConfigError
from mixtral_jax.tokenizer import train_tokenizer
from mixtral_jax.train import data, trainer
from mixtral_jax.train.config import load_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")  # a text file: another data source
SMALL = [
    "model.num_layers=1",
    "train.batch_size=2",
    "train.seq_len=16",
    "data.vocab_size=128",
    "train.eval_every=1000",
    "data.eval_fraction=0.0",
    "train.log_every=1",
    "train.warmup_steps=0",
    "checkpoint.save_every=1",
    "checkpoint.async_save=false",
]


def _config(run_dir, *overrides):
    return load_run_config(None, [f"checkpoint.dir={run_dir}", *SMALL, *overrides])


def _saved(run_dir) -> dict[int, dict]:
    """Every checkpoint of the run as saved: {step: state}."""
    ckpt = TrainCheckpointer(str(run_dir), keep=10, async_save=False)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    out = {s: ckpt.manager.restore(s, args=args)["state"] for s in ckpt.steps()}
    ckpt.close()
    return out


def _finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def _train_main():
    """train.py's main(), imported from the repository root."""
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ---- 1. never save garbage -----------------------------------------------------------------
def test_overflowing_updates_reach_no_checkpoint_and_no_model(tmp_path, monkeypatch):
    """An optimizer whose update overflows float32 (lr 1e39): loss and gradient stay finite,
    every step is skipped, and the checkpoints and the final model hold the finite start."""
    monkeypatch.setattr(trainer, "make_optimizer", lambda tc, params: optax.sgd(1e39))
    trainer.run(_config(tmp_path, "train.steps=2"), show_progress=False)
    saved = _saved(tmp_path)
    assert sorted(saved) == [1, 2]
    assert all(_finite(state["params"]) for state in saved.values())
    _, model = mj.checkpoint.load_model(str(tmp_path / "model"))
    assert _finite(model)


def test_halt_names_the_checkpoints_saved_before_it(tmp_path, monkeypatch):
    original = data.BatchIterator.__next__
    served = []

    def poisoned_from_the_third(self):
        batch = dict(original(self))
        served.append(1)
        if len(served) >= 3:
            batch["loss_mask"] = batch["loss_mask"] * np.nan
        return batch

    monkeypatch.setattr(data.BatchIterator, "__next__", poisoned_from_the_third)
    cfg = _config(tmp_path, "train.steps=10", "train.max_bad_steps=2", "checkpoint.keep=5")
    with pytest.raises(trainer.NumericsHalt) as halt:
        trainer.run(cfg, show_progress=False)
    message = str(halt.value)
    assert message.startswith("2 consecutive non-finite steps at step 4")
    assert "saved checkpoints (finite): steps 1, 2, 3; a restart resumes from step 3" in message
    assert "nothing saved" not in message and "\n" not in message
    assert sorted(_saved(tmp_path)) == [1, 2, 3]


def test_non_finite_state_from_a_bad_checkpoint_is_never_saved_again(tmp_path, monkeypatch):
    """A checkpoint written before the guard checked updates holds NaN: resuming from it skips
    every step, and the save refuses the state instead of writing NaN again."""
    trainer.run(_config(tmp_path, "train.steps=1"), show_progress=False)
    original = TrainCheckpointer.restore

    def nan_weights(self, step, abstract_state):
        state, meta = original(self, step, abstract_state)
        state["params"] = jax.tree.map(lambda x: x * np.nan, state["params"])
        return state, meta

    monkeypatch.setattr(TrainCheckpointer, "restore", nan_weights)
    with pytest.raises(trainer.NumericsHalt) as halt:
        trainer.run(_config(tmp_path, "train.steps=3"), show_progress=False)
    assert str(halt.value).startswith("the training state of step 2 is not finite: not saved")
    assert "saved checkpoints (finite): step 1;" in str(halt.value)
    assert sorted(_saved(tmp_path)) == [1] and _finite(_saved(tmp_path)[1])


# ---- 2. a finished run is a no-op ---------------------------------------------------------
def test_rerunning_a_finished_run_is_a_no_op_and_restores_a_missing_model(tmp_path, capsys):
    main = _train_main()
    argv = [f"--checkpoint.dir={tmp_path}", "--train.steps=2", *[f"--{o}" for o in SMALL]]
    assert main(argv) == 0
    model = tmp_path / "model"
    written = os.path.getmtime(model / "config.json")
    capsys.readouterr()
    assert main(argv) == 0  # today: KeyError 'loss'
    out = capsys.readouterr().out
    assert f"run complete: step 2 of train.steps=2 is already trained in {tmp_path}" in out
    assert "(unchanged)" in out and os.path.getmtime(model / "config.json") == written
    os.remove(tmp_path / trainer.MODEL_STEP_FILE)  # killed after the model, before its marker
    assert main(argv) == 0 and "(written now)" in capsys.readouterr().out
    shutil.rmtree(model)  # killed before the final model write
    assert main(argv) == 0 and "(written now)" in capsys.readouterr().out
    _, params = mj.checkpoint.load_model(str(model))
    final = _saved(tmp_path)[2]["params"]
    jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, final))
    assert sorted(_saved(tmp_path)) == [1, 2]  # nothing trained again


# ---- 3. a changed resume is refused --------------------------------------------------------
@pytest.mark.parametrize(
    "change,message",
    [
        ("train.lr=0.01", "train.lr changed since checkpoint step 1 of .*: 0.003 -> 0.01"),
        ("train.batch_size=4", "train.batch_size changed .*: 2 -> 4"),
        ("seed=7", "seed changed .*: 0 -> 7"),
        ("model.num_layers=2", "model.num_layers changed .*: 1 -> 2"),
        ("train.grad_accum=2", "train.grad_accum changed .*: 1 -> 2"),
        (f"data.source={README}", f"data.source changed .*: 'builtin:pydoc' -> '{README}'"),
    ],
)
def test_resume_with_a_result_changing_setting_is_refused(tmp_path_factory, change, message):
    run_dir = _one_step_run(tmp_path_factory)
    with pytest.raises(ConfigError, match=message + r".*checkpoint.allow_config_change=true"):
        trainer.run(_config(run_dir, "train.steps=2", change), show_progress=False)
    assert sorted(_saved(run_dir)) == [1]


_ONE_STEP = {}


def _one_step_run(tmp_path_factory):
    if "dir" not in _ONE_STEP:  # one run shared by the parametrized cases (never extended)
        _ONE_STEP["dir"] = tmp_path_factory.mktemp("one_step")
        trainer.run(_config(_ONE_STEP["dir"], "train.steps=1"), show_progress=False)
    return _ONE_STEP["dir"]


def test_allowed_config_change_and_a_longer_run_resume(tmp_path):
    trainer.run(_config(tmp_path, "train.steps=1"), show_progress=False)
    changed = _config(tmp_path, "train.steps=2", "train.lr=0.01")
    with pytest.raises(ConfigError, match="train.lr changed"):
        trainer.run(changed, show_progress=False)
    allowed = _config(  # steps, logging and checkpointing may change without the flag
        tmp_path,
        "train.steps=2",
        "train.lr=0.01",
        "train.log_every=5",
        "checkpoint.keep=4",
        "checkpoint.allow_config_change=true",
    )
    assert trainer.run(allowed, show_progress=False)["step"] == 2


# ---- resume restores the weights and the RNG ----------------------------------------------
def test_resume_equals_the_uninterrupted_run_with_router_jitter(tmp_path, capsys):
    """Step 1 trains at a non-zero lr, so fresh weights after the stop would differ; router
    jitter draws from TrainState.rng, so a reset RNG would differ too."""
    jitter = ("model.router_jitter_noise=0.2", "train.lr=0.01")
    trainer.run(_config(tmp_path / "ref", "train.steps=2", *jitter), show_progress=False)
    trainer.run(_config(tmp_path / "cut", "train.steps=1", *jitter), show_progress=False)
    capsys.readouterr()
    trainer.run(_config(tmp_path / "cut", "train.steps=2", *jitter), show_progress=False)
    assert "resumed from step 1" in capsys.readouterr().out
    first = json.loads((tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["lr"] == pytest.approx(0.01)  # step 1 moved the weights
    ref, cut = _saved(tmp_path / "ref"), _saved(tmp_path / "cut")
    jax.tree.map(np.testing.assert_array_equal, cut[2], ref[2])


# ---- 4. bad input is one line --------------------------------------------------------------
def _cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), f"--checkpoint.dir={tmp_path / 'r'}"]
        + list(args),
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "arg,message",
    [
        ("--train.lr=1e39", "error: train.lr=1e+39: must be > 0 and finite in float32"),
        ("--train.lr=inf", "error: train.lr=inf: must be > 0 and finite in float32"),
        ("--seed=-1", "error: seed=-1: must be in [0, 9223372036854775806]"),
        ("--seed=18446744073709551616", "error: seed=18446744073709551616: must be in [0, "),
    ],
)
def test_bad_float_and_seed_are_one_line_errors(tmp_path, arg, message):
    result = _cli(tmp_path, "--train.steps=3", "--train.warmup_steps=0", arg)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    assert result.stderr.startswith(message)
    assert not (tmp_path / "r").exists()


def test_binary_data_source_is_a_one_line_error(tmp_path):
    source = tmp_path / "data.txt"
    source.write_bytes(b"fine text\nmore text\n\xff\xfe\x00binary")
    result = _cli(tmp_path, f"--data.source={source}")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: data source {source} is not UTF-8 text: byte 0xff at line 3, offset 20 "
        "(a binary file? text sources are .txt / .jsonl, token ids .npy)"
    )


def test_out_of_vocabulary_ids_in_a_npy_source_are_named(tmp_path):
    docs = data.read_documents(data.BUILTIN_PYDOC)[:10]
    train_tokenizer([p for d in docs for p in d.split("\n\n")], str(tmp_path / "tok.model"), 100)
    ids = np.tile(np.array([1, 5, 6, 7, 8, 9, 2], np.int32), 20)
    ids[40] = 600  # the tiny model has 512 tokens
    np.save(tmp_path / "ids.npy", ids)
    cfg = _config(
        tmp_path / "run",
        "train.steps=2",
        f"data.source={tmp_path / 'ids.npy'}",
        f"data.tokenizer={tmp_path / 'tok.model'}",
    )
    with pytest.raises(ConfigError) as err:
        trainer.run(cfg, show_progress=False)
    assert str(err.value) == (
        f"data source {tmp_path / 'ids.npy'} holds token id 600, outside the model's "
        "vocabulary of 512 (model.vocab_size)"
    )


def test_full_disk_during_save_is_one_line_and_the_noise_goes_to_the_log(
    tmp_path, monkeypatch, capfd
):
    """Orbax reports a failed save with tracebacks through absl logging and its threads; the
    terminal gets one line, the run's log file the rest."""
    original = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step < 2:
            return original(self, step, *args, **kwargs)
        try:
            raise OSError(errno.ENOSPC, "simulated write of a shard")
        except OSError:
            absl_logging.error("simulated Orbax error report", exc_info=True)
        thread = threading.Thread(target=lambda: 1 / 0, name="simulated-async-save")
        thread.start()
        thread.join()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a terminal: absl adds its own
    main = _train_main()
    assert (
        main([f"--checkpoint.dir={tmp_path}", "--train.steps=3", *[f"--{o}" for o in SMALL]]) == 1
    )
    err = capfd.readouterr().err
    log = tmp_path / "train.log"
    want = (
        "error: checkpoint save failed at step 2: [Errno 28] No space left on device "
        f"(details in {log})"
    )
    assert err.strip().splitlines()[-1] == want
    assert "Traceback" not in err and "simulated" not in err
    text = log.read_text()
    assert "simulated Orbax error report" in text and "ZeroDivisionError" in text
    assert "Traceback" in text and "No space left on device" in text
