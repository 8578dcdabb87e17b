"""Multi-process start-up: the environment rules, and a real two-process training run on CPU
(gloo) that ends with the same weights as one process on as many devices."""

import os
import re
import socket
import subprocess
import sys

import pytest

from mixtral_jax.config import ConfigError
from mixtral_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_one_process_needs_no_start_up(clean_env):
    assert distributed.initialize() is False
    assert distributed.initialize("localhost:1234", 1, 0) is False
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("TPU_WORKER_HOSTNAMES", "only-me")
    assert distributed.initialize() is False
    assert distributed.is_main()


@pytest.mark.parametrize(
    "args,env,message",
    [
        (("host:1", None, None), {}, "without both the process count"),
        (("host:1", 2, 2), {}, r"process_id=2: must be in \[0, num_processes=2\)"),
        ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two'"),
        ((None, 2, 1), {}, "without a coordinator address"),
    ],
)
def test_incomplete_set_up_is_a_one_line_error(clean_env, args, env, message):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(*args)


def test_clusters_are_detected_from_their_environment(clean_env, monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda *a: calls.append(a))
    clean_env.setenv("SLURM_NTASKS", "4")
    assert distributed.initialize() is True and calls == [()]
    clean_env.delenv("SLURM_NTASKS")
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "2")
    clean_env.setenv("JAX_PROCESS_ID", "1")
    assert distributed.initialize() is True and calls[-1] == ("10.0.0.1:1234", 2, 1)


def test_process_rows_are_the_rows_of_the_process_devices():
    """A process of devices 0-3 (data=2, fsdp=2, tensor=2: tensor pairs share rows) loads rows
    0-3 of each micro-batch of 8; one of devices 0, 1, 4, 5 loads rows 0, 1, 4, 5, and the
    global array built from its rows alone holds them in place."""
    import jax
    import numpy as np

    from mixtral_jax.parallel import sharding as sh

    mesh = sh.make_mesh(sh.MeshConfig.parse("data=2,fsdp=2,tensor=2"))
    where = sh.batch_sharding(mesh, 3, leading=1)
    shape = (2, 8, 3)
    devices = jax.devices()
    rows = distributed.process_rows(where, shape, 1, devices=devices[:4])
    np.testing.assert_array_equal(rows, [0, 1, 2, 3])
    rows = distributed.process_rows(where, shape, 1, devices=[devices[i] for i in (0, 1, 4, 5)])
    np.testing.assert_array_equal(rows, [0, 1, 4, 5])
    full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(distributed.process_rows(where, shape, 1), np.arange(8))
    np.testing.assert_array_equal(distributed.global_batch(full, where, shape), full)


def test_two_process_training_equals_one_process(clean_env, tmp_path):
    """train.py in 2 processes x 2 CPU devices (data=4), each loading only its half of every
    batch: same loss and final weights as one process on 4 devices; one tokenizer, one manifest
    per step, one final model."""
    small = [
        "--model.num_layers=1",
        "--train.batch_size=4",
        "--train.seq_len=32",
        "--data.vocab_size=128",
        "--train.warmup_steps=1",
        "--train.steps=2",
        "--train.eval_every=1000",
        "--checkpoint.save_every=1",
        "--checkpoint.async_save=false",
        "--mesh.data=4",
    ]
    outs = _two_processes(tmp_path / "multi", small)

    import numpy as np

    from mixtral_jax import checkpoint
    from mixtral_jax.train import trainer
    from mixtral_jax.train.config import load_run_config

    cfg = load_run_config(None, [o[2:] for o in small] + [f"checkpoint.dir={tmp_path / 'one'}"])
    result = trainer.run(cfg, show_progress=False)
    assert f"train loss {result['loss']:.3f}" in outs[0]
    _, multi = checkpoint.load_model(str(tmp_path / "multi" / "model"))
    _, one = checkpoint.load_model(str(tmp_path / "one" / "model"))
    for a, b in zip(jax_leaves(multi), jax_leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert sorted(os.listdir(tmp_path / "multi" / "manifests")) == ["1", "2"]
    assert sorted(os.listdir(tmp_path / "multi" / "manifests" / "2")) == ["0.json", "1.json"]


def _two_processes(run_dir, args, timeout=300, script="train.py") -> list[str]:
    """Runs train.py (or another `script` taking its flags) as 2 processes x 2 CPU devices;
    their outputs (stdout + stderr)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
        " --xla_cpu_use_fusion_emitters=false",  # as conftest.py
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, script),
                *args,
                f"--checkpoint.dir={run_dir}",
                f"--coordinator=localhost:{port}",
                "--num-processes=2",
                f"--process-id={i}",
            ],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_each_process_checksums_its_own_shards_and_a_bad_one_is_caught(clean_env, tmp_path):
    """fsdp=4 over 2 processes: each process's manifest part lists only shards on its own
    devices (disjoint, together the whole state, each about half the bytes); a flipped byte in
    a data file process 1 wrote makes the resume skip that step and resume from the one before."""
    import json

    small = [
        "--model.num_layers=1",
        "--train.batch_size=4",
        "--train.seq_len=32",
        "--data.vocab_size=128",
        "--train.warmup_steps=1",
        "--train.eval_every=1000",
        "--checkpoint.save_every=1",
        "--checkpoint.async_save=false",
        "--mesh.fsdp=4",
    ]
    run = tmp_path / "run"
    _two_processes(run, [*small, "--train.steps=2"])
    parts = [json.loads((run / "manifests" / "2" / f"{p}.json").read_text()) for p in (0, 1)]
    keys = [{(n, i) for n, crcs in part["shards"].items() for i in crcs} for part in parts]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    total = parts[0]["bytes"] + parts[1]["bytes"]
    assert 0.3 * total < parts[1]["bytes"] < 0.7 * total  # halves, not a gathered whole
    w_up = "['params']['layers']['moe']['w_up']"
    assert set(parts[0]["shards"][w_up]).isdisjoint(parts[1]["shards"][w_up])
    data = run / "checkpoints" / "2" / "state" / "ocdbt.process_1" / "d"
    target = max(data.iterdir(), key=lambda f: f.stat().st_size)
    blob = bytearray(target.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0xFF
    target.write_bytes(bytes(blob))
    outs = _two_processes(run, [*small, "--train.steps=3"])
    for out in outs:
        assert "skipping checkpoint step 2: " in out and "resumed from step 1" in out, out[-2000:]
    assert "skipping checkpoint step 2: does not verify on process 1" in outs[0]
    assert re.search(r"step 2: corrupted: array \S+ shard \[[0-9:,]+\] does not match", outs[1])


def jax_leaves(tree):
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
