"""Training: learning, exact resume after kill -9, checkpoint integrity, accumulation, guards."""

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.checkpoint.train import TrainCheckpointer
from mixtral_jax.config import ConfigError
from mixtral_jax.model import moe as moe_block
from mixtral_jax.train import data, trainer
from mixtral_jax.train.config import load_run_config
from mixtral_jax.train.step import (
    init_state,
    make_optimizer,
    make_train_step,
    split_micro_batches,
    state_shardings,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "--model.num_layers=1",
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--data.vocab_size=128",
    "--train.log_every=1",
    "--train.eval_every=1000",
    "--train.warmup_steps=2",
]


def _config(run_dir, *overrides):
    return load_run_config(None, [f"checkpoint.dir={run_dir}", *[o[2:] for o in overrides]])


def test_default_corpus_loss_falls_well_below_unigram_entropy(tmp_path):
    # 100 steps: train and eval loss end 1.0 below the unigram entropy (5.59), 0.4 of headroom
    # over the 0.6 asked (150 steps reached 1.45; 80 only 0.75).
    cfg = _config(
        tmp_path,
        "--train.steps=100",
        "--train.seq_len=64",
        "--train.eval_every=100",
        "--train.log_every=25",
    )
    result = trainer.run(cfg, show_progress=False)
    assert result["unigram_entropy"] > 5.0
    assert result["eval_loss"] < result["unigram_entropy"] - 0.6
    assert result["loss"] < result["unigram_entropy"] - 0.6
    # perplexity is exp of the eval loss (nats), below the unigram model's exp(entropy)
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]), rel=1e-6)
    assert result["eval_perplexity"] < math.exp(result["unigram_entropy"] - 0.6)
    cfg_loaded, _params = mj.checkpoint.load_model(str(tmp_path / "model"))
    assert cfg_loaded.vocab_size == 512 and (tmp_path / "model" / "tokenizer.model").is_file()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 3 and any('"tokens_per_expert": [[' in line for line in lines)
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def _saving_run(steps):
    return [*SMALL, f"--train.steps={steps}", "--checkpoint.save_every=1", "--checkpoint.keep=2"]


def _train_cmd(run_dir, steps):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        *_saving_run(steps),
        f"--checkpoint.dir={run_dir}",
    ]


def _final_state(run_dir):
    ckpt = TrainCheckpointer(str(run_dir), keep=2, async_save=False)
    step = ckpt.steps()[-1]
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    state = ckpt.manager.restore(step, args=args)["state"]  # as saved; integrity tested below
    ckpt.close()
    return step, state


def _complete_steps(run_dir) -> list[int]:
    """Steps whose Orbax directory is finalized and whose manifest part is written."""
    root = run_dir / "checkpoints"
    names = os.listdir(root) if root.is_dir() else []
    done = [int(n) for n in names if n.isdigit()]
    return sorted(s for s in done if (run_dir / "manifests" / str(s) / "0.json").is_file())


def _in_flight_steps(run_dir) -> list[int]:
    root = run_dir / "checkpoints"
    names = os.listdir(root) if root.is_dir() else []
    return sorted(int(n.split(".")[0]) for n in names if ".orbax-checkpoint-tmp" in n)


def _start(run_dir, steps, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        return subprocess.Popen(
            _train_cmd(run_dir, steps), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )


def _kill_when(proc, ready, what: str, timeout=120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (polled every 2 ms)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"train.py ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.002)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()


@pytest.mark.slow
def test_kill_9_after_and_during_a_save_then_resume_is_bit_identical(tmp_path):
    """train.py killed right after a checkpoint lands, restarted and killed again while an
    async save is in flight, then restarted to the end: each restart says it resumed from the
    newest complete checkpoint on disk at its kill (never from the half-written one), and the
    final state equals an uninterrupted run's bit for bit."""
    steps = 10
    run_dir = tmp_path / "run"
    proc = _start(run_dir, steps, tmp_path / "1.log")
    _kill_when(proc, lambda: bool(_complete_steps(run_dir)), "checkpoint")
    after_save = _complete_steps(run_dir)[-1]
    during_save, resumed = None, after_save
    for attempt in range(3):  # a save may finish between the poll and the kill: try again
        proc = _start(run_dir, steps, tmp_path / f"{attempt + 2}.log")
        _kill_when(
            proc, lambda r=resumed: any(s > r for s in _in_flight_steps(run_dir)), "save in flight"
        )
        log = (tmp_path / f"{attempt + 2}.log").read_text()
        assert f"resumed from step {resumed} of {run_dir}" in log, log[-2000:]
        resumed = _complete_steps(run_dir)[-1]
        flying = [s for s in _in_flight_steps(run_dir) if s > resumed]
        if flying:  # killed with that save still half-written
            during_save = flying[-1]
            break
    assert during_save is not None, "no kill landed during a save in 3 attempts"
    final = subprocess.run(
        _train_cmd(run_dir, steps), capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    assert f"resumed from step {resumed} of {run_dir}" in final.stdout
    assert 1 <= after_save <= resumed < during_save <= steps
    step, state = _final_state(run_dir)
    trainer.run(_config(tmp_path / "ref", *_saving_run(steps)), show_progress=False)
    ref_step, ref = _final_state(tmp_path / "ref")
    assert step == ref_step == steps
    jax.tree.map(np.testing.assert_array_equal, state, ref)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    """A flipped data byte in step 4: the resume says it skipped step 4, moves it aside and
    resumes from step 2 (saving step 4 again)."""
    cfg = _config(tmp_path, *SMALL, "--train.steps=4", "--checkpoint.save_every=2")
    trainer.run(cfg, show_progress=False)
    files = [
        os.path.join(d, f)
        for d, _, fs in os.walk(tmp_path / "checkpoints" / "4" / "state")
        for f in fs
        if "manifest" not in f and not f.startswith("_")
    ]
    target = max(files, key=os.path.getsize)
    with open(target, "rb") as f:
        blob = bytearray(f.read())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0xFF
    with open(target, "wb") as f:
        f.write(bytes(blob))
    capsys.readouterr()
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=5))
    assert trainer.run(longer, show_progress=False)["step"] == 5
    out = capsys.readouterr().out
    assert "skipping checkpoint step 4: " in out
    assert f"resumed from step 2 of {tmp_path}" in out
    assert len(os.listdir(tmp_path / "skipped")) == 1


def test_interrupted_save_is_never_resumed_from(tmp_path, capsys):
    cfg = _config(tmp_path, *SMALL, "--train.steps=2", "--checkpoint.save_every=1")
    trainer.run(cfg, show_progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    stale = ckpt_dir / "3.orbax-checkpoint-tmp-1234567"  # a save killed half-way
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "junk").write_bytes(b"half a checkpoint")
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, async_save=False)
    assert ckpt.steps() == [1, 2]
    assert not stale.exists()  # stale temporary directories are cleaned
    ckpt.close()
    (tmp_path / "manifests" / "2" / "0.json").write_text('{"step": 2, "arr')  # cut short
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3))
    capsys.readouterr()
    trainer.run(longer, show_progress=False)
    out = capsys.readouterr().out
    assert "skipping checkpoint step 2: manifests/2/0.json is not valid JSON" in out
    assert "resumed from step 1" in out


def _tiny_setup(grad_accum, aux=0.0):
    cfg = _config(
        "/tmp/unused",
        *SMALL,
        f"--train.grad_accum={grad_accum}",
        f"--train.aux_loss_coef={aux}",
        "--train.router_z_loss_coef=0.0",
        "--train.batch_size=4",
    )
    model_cfg = mj.ModelConfig.tiny(num_layers=1, vocab_size=64)
    model = mj.init(model_cfg, 0)
    tx = make_optimizer(cfg.train, mj.get_params(model))
    return cfg.train, nnx.graphdef(model), tx, init_state(mj.get_params(model), tx, 0)


def _one_device_step(graphdef, tx, tc, state):
    """make_train_step on the 1x1x1x1 mesh a run without a [mesh] table gets."""
    mesh = trainer.make_run_mesh(_config("/tmp/unused"))
    return make_train_step(
        graphdef, tx, tc, mesh=mesh, shardings=state_shardings(state.params, tx, mesh)
    )


def _batch(seed=0):
    rows = data.pack(
        [np.random.default_rng(seed + i).integers(3, 64, 40).astype(np.int32) for i in range(6)],
        24,
        seed,
    )
    return data.make_batch(rows, np.arange(4))


def test_gradient_accumulation_equals_one_big_batch():
    batch = _batch()
    states = []
    for accum in (1, 2, 4):
        tc, graphdef, tx, state = _tiny_setup(accum)
        step = _one_device_step(graphdef, tx, tc, state)
        state, m = step(state, jax.tree.map(jnp.asarray, split_micro_batches(batch, accum)))
        states.append((state, float(m["ce"])))
    (ref, ref_ce), *others = states
    for state, ce in others:
        assert ce == pytest.approx(ref_ce, rel=1e-6)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_non_finite_step_is_skipped_and_counted():
    tc, graphdef, tx, state = _tiny_setup(1)
    step = _one_device_step(graphdef, tx, tc, state)
    before = jax.tree.map(np.array, state.params)
    bad = dict(_batch())
    bad["loss_mask"] = bad["loss_mask"] * np.nan
    state, m = step(state, jax.tree.map(jnp.asarray, split_micro_batches(bad, 1)))
    assert not bool(m["finite"]) and int(state.bad_steps) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, state.params), before)
    state, m = step(state, jax.tree.map(jnp.asarray, split_micro_batches(_batch(), 1)))
    assert bool(m["finite"]) and int(state.bad_steps) == 0


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def test_router_losses_push_the_right_way():
    cfg = mj.ModelConfig.tiny(num_experts=4, moe_impl="dense")
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(0))
    router = np.zeros((cfg.embed_dim, 4), np.float32)
    router[:, 0] = 0.02  # skewed (logit ~1.3 above the rest): most tokens prefer expert 0
    block.router[...] = jnp.asarray(router)
    x = jax.random.normal(jax.random.key(0), (4, 16, cfg.embed_dim)) + 1.0
    graphdef, state = nnx.split(block)

    def aux_of(state):
        return nnx.merge(graphdef, state)(x)[1]

    for name in ("router_z_loss", "load_balance_loss"):
        grads = jax.grad(lambda s, name=name: getattr(aux_of(s), name))(state)
        size = 0.01 / float(optax_norm(grads))  # a small step along the negative gradient
        moved = jax.tree.map(lambda p, g, size=size: p - size * g, state, grads)
        before, after = aux_of(state), aux_of(moved)
        assert float(getattr(after, name)) < float(getattr(before, name))
        if name == "router_z_loss":  # logits shrink toward zero
            logits_before = float(jnp.mean(jnp.abs(before.router_logits)))
            assert float(jnp.mean(jnp.abs(after.router_logits))) < logits_before
        else:  # probability mass moves off the overloaded expert
            assert float(after.router_prob[0]) < float(before.router_prob[0])


def test_bad_config_is_a_one_line_error_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "train.py"),
            "--train.steps=0",
            f"--checkpoint.dir={tmp_path / 'x'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: train.steps=0: must be >= 1"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        [*_train_cmd(tmp_path, 100000), "--checkpoint.save_every=1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    log = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: saved step" in out
    ckpt = TrainCheckpointer(str(tmp_path), keep=2, async_save=False)
    assert len(ckpt.steps()) == 1 and 0 < ckpt.steps()[0] < 100000
    ckpt.close()


def test_failed_checkpoint_save_stops_the_run_loudly(tmp_path, monkeypatch):
    """Orbax reports a failed background save at the next save or wait: the run must stop."""
    original = ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 2:
            raise OSError("disk full (simulated)")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    cfg = _config(tmp_path, *SMALL, "--train.steps=4", "--checkpoint.save_every=1")
    with pytest.raises(RuntimeError, match="checkpoint save failed at step 2: disk full"):
        trainer.run(cfg, show_progress=False)
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, async_save=False)
    assert ckpt.steps() == [1]  # nothing after the failure, and no final model written
    ckpt.close()
    assert not (tmp_path / "model").exists()


def test_repeated_non_finite_steps_halt_without_bad_weights(tmp_path, monkeypatch):
    original = data.BatchIterator.__next__

    def poisoned(self):
        batch = dict(original(self))
        batch["loss_mask"] = batch["loss_mask"] * np.nan
        return batch

    monkeypatch.setattr(data.BatchIterator, "__next__", poisoned)
    cfg = _config(
        tmp_path,
        *SMALL,
        "--train.steps=10",
        "--train.max_bad_steps=3",
        "--checkpoint.save_every=1",
        "--checkpoint.async_save=false",
    )
    with pytest.raises(trainer.NumericsHalt, match="3 consecutive non-finite steps at step 3"):
        trainer.run(cfg, show_progress=False)
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, async_save=False)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    saved = ckpt.manager.restore(ckpt.steps()[-1], args=args)["state"]
    ckpt.close()
    assert ckpt.steps()[-1] == 2  # the halting step is not saved
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved["params"]))
    assert not (tmp_path / "model").exists()


def test_training_starts_from_a_model_checkpoint(tmp_path):
    """An upcycled dense model (issue 8) fine-tunes with train.py: the run starts at its weights."""
    from test_upcycle import _dense_mistral

    from mixtral_jax import upcycle
    from mixtral_jax.tokenizer import train_tokenizer

    _, dense_cfg, state = _dense_mistral(None)
    cfg = upcycle.upcycled_config(dense_cfg, 4, 2)
    start = upcycle.upcycle_params(state.__getitem__, cfg)
    docs = data.read_documents(data.BUILTIN_PYDOC)
    tok = train_tokenizer(
        [p for d in docs[:20] for p in d.split("\n\n")], str(tmp_path / "tok.model"), 100
    )
    assert tok.vocab_size <= cfg.vocab_size
    mj.checkpoint.save_model(str(tmp_path / "start"), start, cfg, str(tmp_path / "tok.model"))
    run_cfg = _config(
        tmp_path / "run",
        "--train.steps=2",
        "--train.batch_size=2",
        "--train.seq_len=32",
        "--train.lr=1e-3",
        "--train.warmup_steps=0",
        f"--checkpoint.init_from={tmp_path / 'start'}",
    )
    trainer.run(run_cfg, show_progress=False)
    final_cfg, final = mj.checkpoint.load_model(str(tmp_path / "run" / "model"))
    assert final_cfg.num_experts == 4 and final_cfg.embed_dim == cfg.embed_dim
    moved = np.abs(np.asarray(final["layers"]["moe"]["w_up"]) - start["layers"]["moe"]["w_up"])
    assert 0 < moved.max() <= 2.5e-3  # two AdamW steps of lr 1e-3 from the starting weights
    with pytest.raises(ConfigError, match="cannot go with checkpoint.init_from"):
        trainer.run(
            dataclasses.replace(
                run_cfg,
                data=dataclasses.replace(run_cfg.data, tokenizer="train"),
                checkpoint=dataclasses.replace(run_cfg.checkpoint, dir=str(tmp_path / "other")),
            ),
            show_progress=False,
        )
