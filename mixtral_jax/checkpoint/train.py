"""Training checkpoints: Orbax CheckpointManager plus a checksum manifest of our own.

Layout under the run directory:

  checkpoints/<step>/        Orbax step: `state` (TrainState as a dict) and `meta` (JSON: data
                             iterator state, run config)
  manifests/<step>.json      CRC32 of every array of that step's state, written at save time

Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save is never listed; leftovers are removed when the manager starts. Orbax does not
check the data itself, so restore recomputes every array's CRC32 and compares it with the
manifest: a corrupted (or manifest-less) checkpoint is refused before use, by name.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from mixtral_jax.config import ConfigError
from mixtral_jax.fileio import atomic_write_text, read_json
from mixtral_jax.parallel import distributed

CHECKPOINTS = "checkpoints"
MANIFESTS = "manifests"
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step still being written


def _leaves(tree) -> dict[str, np.ndarray]:
    """Whole host values (gathered across processes: every process calls this in step)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): distributed.host_array(x) for p, x in flat}


def checksums(tree) -> dict[str, str]:
    """CRC32 (hex) of the bytes of every array leaf, keyed by its tree path."""
    out = {}
    for name, arr in _leaves(tree).items():
        out[name] = f"{zlib.crc32(np.ascontiguousarray(arr).tobytes()):08x}:{arr.dtype}:{arr.shape}"
    return out


class TrainCheckpointer:
    """Saves and restores training state with keep-N, async writes and verified restores."""

    def __init__(self, run_dir: str, *, keep: int, async_save: bool):
        self.run_dir = os.path.abspath(run_dir)
        self.manifest_dir = os.path.join(self.run_dir, MANIFESTS)
        os.makedirs(self.manifest_dir, exist_ok=True)
        self._remove_interrupted_saves()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(
            os.path.join(self.run_dir, CHECKPOINTS), options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        """Finished checkpoints (an interrupted save is never listed)."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Starts saving `state` (a pytree of arrays) and `meta` (JSON) as `step`.

        The manifest is written before the save starts, so every step Orbax finalizes has one.
        Raises the error of an earlier failed asynchronous save (Orbax reports it here).
        """
        manifest = {"step": step, "arrays": checksums(state)}
        path = os.path.join(self.manifest_dir, f"{step}.json")
        if distributed.is_main():  # one writer; every process computed the same sums
            atomic_write_text(path, json.dumps(manifest))
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        except Exception as e:
            raise RuntimeError(f"checkpoint save failed at step {step}: {e}") from e
        self._drop_stale_manifests()

    def wait(self) -> None:
        """Blocks until pending saves are written; raises if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise RuntimeError(f"checkpoint save failed: {e}") from e
        self._drop_stale_manifests()

    def restore(self, step: int, abstract_state) -> tuple[dict, dict]:
        """(state, meta) of `step`, after checking every array against the manifest."""
        path = os.path.join(self.manifest_dir, f"{step}.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"checkpoint step {step} in {self.run_dir} has no manifest: "
                "refusing to use it unverified"
            )
        expected = read_json(path, "checkpoint manifest")["arrays"]
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"checkpoint step {step} in {self.run_dir} is corrupted: "
                f"{str(e).splitlines()[0][:200]}"
            ) from None
        got = checksums(restored["state"])
        bad = sorted(k for k in expected if got.get(k) != expected[k])
        if bad or set(got) != set(expected):
            name = bad[0] if bad else min(set(got) ^ set(expected))
            raise ConfigError(
                f"checkpoint step {step} in {self.run_dir} is corrupted: array "
                f"{name} does not match its checksum ({len(bad)} of "
                f"{len(expected)} arrays differ)"
            )
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def close_after_error(self) -> None:
        """Lets saves already in flight finish (they hold good, earlier steps), then closes;
        a second error here would hide the first, so it is only reported."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            print(f"warning: while stopping, a pending checkpoint save failed too: {e}")

    def _remove_interrupted_saves(self) -> None:
        """Deletes temporary step directories left by a save that never finished (Orbax would
        only do it before its next save; a crashed run should not keep them meanwhile)."""
        root = os.path.join(self.run_dir, CHECKPOINTS)
        if jax.process_index() != 0 or not os.path.isdir(root):
            return
        for name in os.listdir(root):
            if TMP_MARKER in name:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def _drop_stale_manifests(self) -> None:
        """Manifests of steps that are gone (keep-N) or never finished and are not in flight."""
        if not distributed.is_main():
            return
        live = set(self.steps())
        for name in os.listdir(self.manifest_dir):
            stem = name.split(".")[0]
            if stem.isdigit() and int(stem) not in live and not self._in_flight(int(stem)):
                os.remove(os.path.join(self.manifest_dir, name))

    def _in_flight(self, step: int) -> bool:
        latest = max([*self.steps(), -1])
        return step > latest  # a newer step than any finished one is still being written
