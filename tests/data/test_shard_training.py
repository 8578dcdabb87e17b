"""Training from prepared shards: bit-identical to the in-memory path on the same corpus,
bit-identical after kill -9 and a resume through train.py, and two processes reading disjoint
rows whose union is the one-process batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mixtral_jax.config import ConfigError
from mixtral_jax.data import prepare, shards
from mixtral_jax.tokenizer import train_tokenizer
from mixtral_jax.train import data, trainer
from mixtral_jax.train.config import load_run_config
from tests.parallel.test_distributed import _two_processes
from tests.train.test_train import _complete_steps, _final_state, _kill_when

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = [
    "model.num_layers=1",
    "train.batch_size=2",
    "train.seq_len=16",
    "train.steps=4",
    "train.lr=0.01",
    "train.warmup_steps=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=2",
    "data.eval_fraction=0.1",
    "checkpoint.save_every=1",
    "checkpoint.async_save=false",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of one text file and one JSONL file, its tokenizer, and its shards (several:
    small work units) in `shards/`."""
    root = tmp_path_factory.mktemp("corpus")
    texts = data.read_documents(data.BUILTIN_PYDOC)[:60]
    (root / "src").mkdir()
    (root / "src" / "a.txt").write_text(texts[0])
    with open(root / "src" / "b.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[1:])
    train_tokenizer([p for t in texts for p in t.split("\n\n")], str(root / "tok.model"), 128)
    index = prepare.prepare(
        [str(root / "src")],
        str(root / "shards"),
        str(root / "tok.model"),
        workers=1,
        unit_bytes=20_000,
        progress=False,
    )
    assert len(index["shards"]) > 3
    return root


@pytest.fixture(scope="module")
def shard_run(corpus):
    """An uninterrupted run from the shards: its run directory and final metrics."""
    run = corpus / "shard_run"
    cfg = load_run_config(
        None, [*SMALL, f"data.source={corpus / 'shards'}", f"checkpoint.dir={run}"]
    )
    return run, trainer.run(cfg, show_progress=False)


def _metrics(run) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "mfu")} for m in lines]


def test_prepared_shards_train_bit_identically_to_the_in_memory_path(corpus, shard_run, tmp_path):
    run, result = shard_run
    overrides = [*SMALL, f"data.source={corpus / 'src'}", f"data.tokenizer={corpus / 'tok.model'}"]
    cfg = load_run_config(None, [*overrides, f"checkpoint.dir={tmp_path}"])
    memory = trainer.run(cfg, show_progress=False)
    for key in ("loss", "ce", "grad_norm", "eval_loss", "unigram_entropy"):
        assert memory[key] == result[key], key
    assert _metrics(tmp_path) == _metrics(run)  # every step's losses and router statistics
    assert any("eval_loss" in m for m in _metrics(run))
    _, want = _final_state(run)
    _, got = _final_state(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_kill_9_and_resume_from_shards_is_bit_identical(corpus, shard_run, tmp_path, capsys):
    """train.py killed (SIGKILL) right after its first checkpoint lands, then resumed."""
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *[f"--{o}" for o in SMALL]]
    cmd += [f"--data.source={corpus / 'shards'}", f"--checkpoint.dir={run}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(tmp_path / "1.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    _kill_when(proc, lambda: bool(_complete_steps(run)), "checkpoint")
    killed_at = _complete_steps(run)[-1]
    assert killed_at < 4
    capsys.readouterr()
    cfg = load_run_config(
        None, [*SMALL, f"data.source={corpus / 'shards'}", f"checkpoint.dir={run}"]
    )
    trainer.run(cfg, show_progress=False)  # the same run resumed (in this process: no start-up)
    assert f"resumed from step {killed_at} of {run}" in capsys.readouterr().out
    step, state = _final_state(run)
    ref_step, ref = _final_state(shard_run[0])
    assert step == ref_step == 4
    jax.tree.map(np.testing.assert_array_equal, state, ref)


def test_two_processes_read_disjoint_rows_of_the_one_process_batches(corpus, tmp_path):
    args = [f"--{o}" for o in SMALL if not o.startswith("train.batch_size")]
    args += ["--train.batch_size=4", "--mesh.data=4", f"--data.source={corpus / 'shards'}"]
    _two_processes(tmp_path, args, script=os.path.join("tests", "data", "two_process_rows.py"))
    parts = [json.loads((tmp_path / f"rows_{p}.json").read_text()) for p in (0, 1)]
    assert parts[0]["local"] == [0, 1] and parts[1]["local"] == [2, 3]
    reads = [{tuple(r) for r in part["reads"]} for part in parts]
    assert reads[0] and reads[1] and not reads[0] & reads[1]  # no slice read by both
    cfg = load_run_config(None, [o[2:] for o in args] + [f"checkpoint.dir={tmp_path / 'one'}"])
    _, _, batches, _ = trainer._prepare_data(cfg)
    for i in range(len(parts[0]["tokens"])):
        whole = next(batches)["tokens"]
        np.testing.assert_array_equal(np.concatenate([p["tokens"][i] for p in parts]), whole)


def test_a_tokenizer_other_than_the_shards_is_refused_naming_it(corpus, tmp_path):
    source = corpus / "shards"
    base = [*SMALL, f"data.source={source}", f"checkpoint.dir={tmp_path}"]
    with pytest.raises(ConfigError, match="data.tokenizer='train' cannot go with the prepared"):
        trainer.run(load_run_config(None, [*base, "data.tokenizer=train"]), show_progress=False)
    with pytest.raises(
        ConfigError, match=rf"data.tokenizer=mistral is not the tokenizer {source} was prepared"
    ):
        trainer.run(load_run_config(None, [*base, "data.tokenizer=mistral"]), show_progress=False)
    with pytest.raises(
        ConfigError, match=r"holds token id 1\d\d, outside the model's vocabulary of 100"
    ):
        shards.ShardSet(str(source)).check_ids(100)
