"""TrainCheckpointer: per-shard checksums by the owning process, nothing gathered, verified
restores that fall back to the newest checkpoint that verifies."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixtral_jax.checkpoint import train as ckpt_lib
from mixtral_jax.checkpoint.train import TrainCheckpointer
from mixtral_jax.config import ConfigError
from mixtral_jax.parallel import distributed

ROWS, COLS = 64, 256  # w: [64, 256] float32 over 8 devices: 8 shards of 8 KiB


def _state(seed: int) -> dict:
    """A small sharded training state: w split over 8 devices, b replicated, step and rng."""
    mesh = jax.make_mesh((8,), ("x",))
    rng = np.random.default_rng(seed)
    w = jax.device_put(
        rng.standard_normal((ROWS, COLS)).astype(np.float32), NamedSharding(mesh, P("x"))
    )
    b = jax.device_put(rng.standard_normal(COLS).astype(np.float32), NamedSharding(mesh, P()))
    return {"params": {"w": w, "b": b}, "step": jnp.int32(seed), "rng": jnp.uint32([seed, 7])}


def _abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _saved_run(run_dir, steps=(1, 2)) -> TrainCheckpointer:
    ckpt = TrainCheckpointer(str(run_dir), keep=3, async_save=True)
    for step in steps:
        ckpt.save(step, _state(step), {"data": {"epoch": 0, "index": 4 * step}})
    ckpt.wait()
    return ckpt


def _part(run_dir, step, process=0):
    return run_dir / "manifests" / str(step) / f"{process}.json"


def test_each_shard_is_hashed_once_by_its_owner_and_verified_on_restore(tmp_path):
    ckpt = _saved_run(tmp_path)
    part = json.loads(_part(tmp_path, 2).read_text())
    w = part["shards"]["['params']['w']"]
    assert sorted(w) == sorted(f"{8 * i}:{8 * i + 8},0:{COLS}" for i in range(8))
    assert list(part["shards"]["['params']['b']"]) == [f"0:{COLS}"]  # replica 0 only
    assert part["bytes"] == (ROWS * COLS + COLS) * 4 + 4 + 8
    assert max(n for _, _, n in ckpt.last_hashed) == 8 * COLS * 4  # never more than a shard
    step, state, meta = ckpt.restore_latest(_abstract(_state(0)))
    assert step == 2 and meta == {"data": {"epoch": 0, "index": 8}}
    jax.tree.map(np.testing.assert_array_equal, state, _state(2))
    ckpt.close()


def test_save_gathers_nothing(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    def gather(*_a, **_k):
        raise AssertionError("a checkpoint save gathered an array")

    monkeypatch.setattr(distributed, "host_array", gather)
    monkeypatch.setattr(multihost_utils, "process_allgather", gather)
    monkeypatch.setattr(jax, "device_get", gather)
    ckpt = _saved_run(tmp_path)
    assert ckpt.steps() == [1, 2] and _part(tmp_path, 2).is_file()
    ckpt.close()


def _flip_data_bytes(run_dir, step):
    root = run_dir / "checkpoints" / str(step) / "state"
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "/d/" in d + "/"]
    target = max(files, key=os.path.getsize)
    with open(target, "rb") as f:
        blob = bytearray(f.read())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0xFF
    with open(target, "wb") as f:
        f.write(bytes(blob))


def _truncate_manifest(run_dir, step):
    path = _part(run_dir, step)
    path.write_text(path.read_text()[:40])


def _edit_data_position(run_dir, step):
    path = run_dir / "checkpoints" / str(step) / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["data"]["index"] += 1
    path.write_text(json.dumps(meta))


def _edit_shard_checksum(run_dir, step):
    path = _part(run_dir, step)
    part = json.loads(path.read_text())
    crcs = part["shards"]["['params']['w']"]
    key = f"24:32,0:{COLS}"
    crcs[key] = f"{int(crcs[key][:8], 16) ^ 1:08x}" + crcs[key][8:]
    path.write_text(json.dumps(part))


@pytest.mark.parametrize(
    "corrupt,reason",
    [
        (_flip_data_bytes, r"(unreadable|corrupted: array \['params'\]\['w'\])"),
        (_truncate_manifest, r"manifests/2/0.json is not valid JSON"),
        (_edit_data_position, r"corrupted: the meta \(data position, config\) does not match"),
        (_edit_shard_checksum, r"corrupted: array \['params'\]\['w'\] shard \[24:32,0:256\]"),
    ],
    ids=["data-byte", "truncated-manifest", "data-position", "shard-checksum"],
)
def test_corrupt_newest_falls_back_to_the_previous_verified(tmp_path, capsys, corrupt, reason):
    _saved_run(tmp_path).close()
    corrupt(tmp_path, 2)
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, async_save=False)
    step, state, meta = ckpt.restore_latest(_abstract(_state(0)))
    ckpt.close()
    assert step == 1 and meta["data"]["index"] == 4
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("skipping checkpoint step 2: ")
    assert lines[1] == f"moved unusable steps 2 to {tmp_path}/skipped"
    assert ckpt.steps() == [1] and not _part(tmp_path, 2).exists()  # step 2 can be saved again
    assert re.search(reason, lines[0]), lines[0]


def test_missing_manifest_part_and_no_verified_step_is_one_error(tmp_path, capsys):
    _saved_run(tmp_path).close()
    part = json.loads(_part(tmp_path, 1).read_text())
    part["process_count"] = 2  # saved by two processes, process 1's part lost
    _part(tmp_path, 1).write_text(json.dumps(part))
    os.remove(_part(tmp_path, 2))
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, async_save=False)
    with pytest.raises(ConfigError, match=r"no checkpoint in .* verifies \(step 2 .*; step 1 "):
        ckpt.restore_latest(_abstract(_state(0)))
    ckpt.close()
    out = capsys.readouterr().out
    assert "skipping checkpoint step 2: no manifest (manifests/2/0.json)" in out
    assert "skipping checkpoint step 1: no manifest part at manifests/1/1.json" in out


def test_failed_hashing_stops_the_next_save(tmp_path, monkeypatch):
    def broken(_host):
        raise OSError("no space left (simulated)")

    monkeypatch.setattr(ckpt_lib, "hash_shards", broken)
    ckpt = TrainCheckpointer(str(tmp_path), keep=3, async_save=True)
    ckpt.save(1, _state(1), {"data": {}})
    with pytest.raises(RuntimeError, match="checkpoint checksums failed: no space left"):
        ckpt.save(2, _state(2), {"data": {}})
    ckpt.close()


def test_save_copies_the_state_once_into_pinned_host_memory(tmp_path, monkeypatch):
    """The copy Orbax writes and the hashes read lives in pinned host memory with the state's
    shardings; restores land in device memory again, equal to what was saved."""
    copies = []

    def recording(tree):
        out = copy(tree)
        copies.append(out)
        return out

    copy = ckpt_lib.pinned_host_copy
    monkeypatch.setattr(ckpt_lib, "pinned_host_copy", recording)
    ckpt = _saved_run(tmp_path, steps=(1,))
    (saved,) = copies
    for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(_state(1))):
        assert x.sharding.memory_kind == "pinned_host"
        assert x.sharding.with_memory_kind("device") == y.sharding
        np.testing.assert_array_equal(x, y)
    _, state, _ = ckpt.restore_latest(_abstract(_state(0)))
    for x in jax.tree.leaves(state):
        assert x.sharding.memory_kind == "device"
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    ckpt.close()
