"""Step-loop stall per checkpoint save, through the real trainer and TrainCheckpointer.

  PYTHONPATH=. python bench/save_stall.py                      # H200: ~10 GB of training state
  PYTHONPATH=. python bench/save_stall.py --layers 1 --dim 64 --hidden 96 --experts 4 \\
      --steps 6 --save-every 2 --seq 32 --batch 2               # tiny, on CPU (a check)

A 9-layer, D=1024, F=3584, 8-expert model (0.83 B parameters; float32 parameters plus AdamW's
two moments: ~10 GB; one layer more than the issue's 8-layer run because the 512-token tokenizer
trained here makes the embeddings small, which would leave 8 layers at 8.9 GB) trains `--steps` steps with a checkpoint every
`--save-every`. Each step's end is stamped (after the step's result is read: the loop blocks
there anyway), so the gap between the step before a save and the step after it, minus the
median gap between steps without a save, is the stall the save added to the step loop. Beside
it: the device-to-host copy of this process's shards (`TrainCheckpointer.last_copy_s`, part of
the stall), the whole `save()` call, and the bytes this process hashed. Writes
$OUT/save_stall.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax

from bench.common import environment, write_json
from mixtral_jax.checkpoint.train import TrainCheckpointer
from mixtral_jax.train import trainer
from mixtral_jax.train.config import load_run_config


def _overrides(a, run_dir: str) -> list[str]:
    return [
        f"model.num_layers={a.layers}",
        f"model.embed_dim={a.dim}",
        f"model.hidden_dim={a.hidden}",
        f"model.num_experts={a.experts}",
        f"model.num_heads={a.heads}",
        f"model.num_kv_heads={a.heads}",
        f"model.head_dim={a.dim // a.heads}",
        f"model.dtype={a.dtype}",
        "model.param_dtype=float32",
        f"model.max_seq_len={max(a.seq, 256)}",
        f"train.steps={a.steps}",
        f"train.batch_size={a.batch}",
        f"train.seq_len={a.seq}",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.warmup_steps=1",
        "data.tokenizer=train",
        "data.vocab_size=512",
        "data.eval_fraction=0",
        f"checkpoint.dir={run_dir}",
        f"checkpoint.save_every={a.save_every}",
        "checkpoint.keep=2",
        "checkpoint.async_save=true",
    ]


class _Probe:
    """Stamps each logged step's end and each save's timings (wrapping the trainer's logger
    and the checkpointer; the library is unchanged)."""

    def __init__(self):
        self.step_end: dict[int, float] = {}
        self.saves: list[dict] = []
        self._log_step = trainer._Logger.step
        self._save = TrainCheckpointer.save

    def __enter__(self):
        probe = self

        def log_step(logger, step, m):
            probe.step_end[step] = time.perf_counter()
            return probe._log_step(logger, step, m)

        def save(ckpt, step, state, meta):
            start = time.perf_counter()
            probe._save(ckpt, step, state, meta)
            probe.saves.append(
                {
                    "step": step,
                    "save_call_s": time.perf_counter() - start,
                    "device_to_host_s": ckpt.last_copy_s,
                    "waited_for_previous_s": ckpt.last_wait_s,
                    "hashed_bytes": sum(n for _, _, n in ckpt.last_hashed),
                    "hashed_shards": len(ckpt.last_hashed),
                }
            )

        trainer._Logger.step, TrainCheckpointer.save = log_step, save
        return self

    def __exit__(self, *exc):
        trainer._Logger.step, TrainCheckpointer.save = self._log_step, self._save


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def stalls(step_end: dict[int, float], saves: list[dict], last: int) -> tuple[float, list[dict]]:
    """(median step gap without a save, saves with their stall) from step-end stamps."""
    saved = {s["step"] for s in saves}
    gaps = {s: step_end[s + 1] - step_end[s] for s in step_end if s + 1 in step_end}
    normal = _median([g for s, g in gaps.items() if s not in saved and s > 2])  # 1-2: compile
    rows = []
    for s in saves:
        if s["step"] in gaps and s["step"] < last:
            gap = gaps[s["step"]]
            rows.append({**s, "gap_s": gap, "stall_s": gap - normal})
    return normal, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=9)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--dir", default=None, help="run directory (default: a fresh temporary one)")
    a = p.parse_args()
    run_dir = a.dir or tempfile.mkdtemp(prefix="save_stall-")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_run_config(None, _overrides(a, run_dir))
    with _Probe() as probe:
        start = time.perf_counter()
        trainer.run(cfg, show_progress=False)
        total = time.perf_counter() - start
    normal, rows = stalls(probe.step_end, probe.saves, a.steps)
    state_bytes = rows[0]["hashed_bytes"] if rows else probe.saves[0]["hashed_bytes"]
    print(
        f"training state {state_bytes / 1e9:.2f} GB (this process's shards), normal step "
        f"{normal * 1e3:.1f} ms, {len(rows)} saves inside the loop, run {total:.0f} s"
    )
    head = ["step", "gap ms", "stall ms", "save() ms", "waited ms", "D2H ms", "GB/s"]
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        rate = r["hashed_bytes"] / max(r["device_to_host_s"], 1e-9) / 1e9
        cells = [r["gap_s"], r["stall_s"], r["save_call_s"], r["waited_for_previous_s"]]
        cells = [f"{c * 1e3:>9.1f}" for c in cells + [r["device_to_host_s"]]]
        print(f"{r['step']:>9} " + " ".join(cells) + f" {rate:>9.1f}")
    write_json(
        "save_stall.json",
        {
            "environment": environment(),
            "args": vars(a),
            "state_bytes_this_process": state_bytes,
            "normal_step_s": normal,
            "saves": rows,
            "max_stall_s": max((r["stall_s"] for r in rows), default=None),
            "device_count": jax.device_count(),
            "run_s": total,
        },
    )
    if not a.dir:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    main()
