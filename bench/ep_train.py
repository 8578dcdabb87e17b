"""Training-step throughput with expert parallelism vs replicated experts, on all local devices.

  PYTHONPATH=. python bench/ep_train.py [--layers 2] [--batch-per-device 2] [--seq 4096]
  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      python bench/ep_train.py --tiny          # the same code path on fake CPU devices

Meshes over the N devices (the real train step: CE + router losses, clipping, AdamW, float32
master weights, bf16 compute at full width):
  replicated  data=N          every device holds every expert (gradients all-reduced)
  expert      expert=N        experts split over devices, tokens moved by all-to-all
  fsdp+expert fsdp=2, expert=N/2 (N >= 4)
Prints tokens/s per device and writes $OUT/ep_train.json. Needs N >= 2 (issue 3's 2- and 4-GPU
figures; device kinds nvidia-h200-x2 / -x4).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

import mixtral_jax as mj
from bench.common import environment, synthetic_batch, time_train_steps, write_json
from mixtral_jax import moe_parallel, sharding, trainer
from mixtral_jax.runconfig import TrainConfig
from mixtral_jax.train_step import make_optimizer, make_train_step


def run(cfg: mj.ModelConfig, tc: TrainConfig, mesh_cfg: sharding.MeshConfig, steps: int) -> dict:
    mesh = sharding.make_mesh(mesh_cfg)
    with moe_parallel.expert_parallel(mesh):
        params = sharding.init_params(cfg, mesh, seed=0)
        tx = make_optimizer(tc, params)
        state = trainer._fresh_state(params, tx, 0, mesh)
        step = make_train_step(nnx.graphdef(mj.abstract(cfg)), tx, tc)
        b, t = tc.batch_size, tc.seq_len
        batch = trainer._on_mesh(synthetic_batch(cfg.vocab_size, b, t), mesh, leading=1)
        state, m, step_s, warm = time_train_steps(step, state, batch, steps)
    n = jax.device_count()
    return {"mesh": str(mesh_cfg), "step_ms": 1e3 * step_s, "tokens_per_s": b * t / step_s,
            "tokens_per_s_per_device": b * t / step_s / n, "loss": float(m["loss"]),
            "warmup_s": warm}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-per-device", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequences (CPU check)")
    args = p.parse_args()
    n = jax.device_count()
    if n < 2:
        raise SystemExit(f"expert parallelism needs >= 2 devices; {n} present")
    if args.tiny:
        cfg = mj.preset("tiny", moe_impl="capacity", capacity_factor=2.0)
        seq, steps = 32, 2
    else:
        cfg = mj.preset("mixtral-8x7b", num_layers=args.layers, dtype="bfloat16",
                        param_dtype="float32", moe_impl="capacity", capacity_factor=1.25,
                        max_seq_len=args.seq)
        seq, steps = args.seq, args.steps
    tc = TrainConfig(steps=1000, batch_size=args.batch_per_device * n, seq_len=seq,
                     warmup_steps=10)
    meshes = [sharding.MeshConfig(data=n), sharding.MeshConfig(expert=n)]
    if n >= 4:
        meshes.append(sharding.MeshConfig(fsdp=2, expert=n // 2))
    rows = []
    for mesh_cfg in meshes:
        rows.append(run(cfg, tc, mesh_cfg, steps))
        print(rows[-1], flush=True)
        jax.clear_caches()
    write_json("ep_train.json", {"env": environment(), "layers": cfg.num_layers, "seq": seq,
                                 "batch": tc.batch_size, "runs": rows})
    print(f"\n{n} devices, {cfg.num_layers} layers, batch {tc.batch_size} x {seq}")
    print(f"{'mesh':>40} {'step ms':>9} {'tok/s/device':>13}")
    for r in rows:
        print(f"{r['mesh']:>40} {r['step_ms']:>9.1f} {r['tokens_per_s_per_device']:>13.0f}")


if __name__ == "__main__":
    main()
