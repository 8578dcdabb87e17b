"""Issue 9: the full Mixtral 8x7B on all local GPUs (meant for 8 H200s): a training step with
FSDP x expert parallelism and expert-parallel decode, with memory per device.

  PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python bench/full_8x7b.py
      [--layers 32] [--mesh fsdp=2,expert=4] [--batch-per-device 1] [--seq 4096]
  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python bench/full_8x7b.py --tiny     # the same code path on fake CPU devices

Training: random init created sharded (never whole on one device), bf16 compute over float32
master weights and AdamW state (`--param-dtype bfloat16` to halve them), the real train step
(capacity path by default: `--moe-impl`), median of `--steps` after 2 warm-up steps; tokens/s
per device and MFU against the bf16 matmul peak measured on one device in the same run
(6 x active parameters + causal attention per token). Beside MaxText's published ~5,960
tokens/s per H200. Decode: bf16 weights sharded on the same mesh, MoE expert-parallel, batch
1 / 8 / 64, 64 new tokens after a 16-token prompt. Writes $OUT/full_8x7b.json.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
from flax import nnx

import mixtral_jax as mj
from bench.common import (
    environment,
    matmul_peak_tflops,
    synthetic_batch,
    time_train_steps,
    write_json,
)
from mixtral_jax.generate import Generator
from mixtral_jax.parallel import sharding
from mixtral_jax.train import metrics, trainer
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import make_optimizer, make_train_step, state_shardings


def peak_memory_gib() -> list[float | None]:
    out = []
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        out.append(None if peak is None else peak / 2**30)
    return out


def train(cfg, mesh, batch: int, seq: int, steps: int) -> dict:
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    with sharding.active(mesh):
        params = mj.init_params(cfg, mesh, seed=0)
        tx = make_optimizer(tc, params)
        state = trainer._fresh_state(params, tx, 0, mesh)
        del params
        step = make_train_step(
            nnx.graphdef(mj.abstract(cfg)),
            tx,
            tc,
            mesh=mesh,
            shardings=state_shardings(state.params, tx, mesh),
        )
        data = trainer._on_mesh(synthetic_batch(cfg.vocab_size, batch, seq), mesh, leading=1)
        state, m, step_s, warm = time_train_steps(step, state, data, steps)
    n = jax.device_count()
    return {
        "step_ms": 1e3 * step_s,
        "tokens_per_s": batch * seq / step_s,
        "tokens_per_s_per_device": batch * seq / step_s / n,
        "loss": float(m["loss"]),
        "warmup_s": warm,
        "flops_per_token": metrics.flops_per_token(cfg, seq),
        "peak_memory_gib_per_device": peak_memory_gib(),
    }


def decode(cfg, mesh, batches: list[int], new: int) -> list[dict]:
    cfg = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    params = mj.init_params(cfg, mesh, seed=1)
    model = mj.from_params(cfg, params)
    rows = []
    with sharding.active(mesh):
        generator = Generator(model, chunk=16)
        rng = np.random.default_rng(0)
        for batch in batches:
            prompts = [list(map(int, rng.integers(3, cfg.vocab_size, 16))) for _ in range(batch)]
            for _ in range(2):  # the second run is timed without compilation
                result = generator.generate(prompts, max_new_tokens=new, eos_id=None)
            rows.append(
                {
                    "batch": batch,
                    "tokens_per_s": result.decode_tokens / result.decode_s,
                    "time_to_first_token_s": result.time_to_first_token_s,
                }
            )
            print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument(
        "--mesh", default="", help="default: expert = gcd(devices, experts), fsdp = the rest"
    )
    p.add_argument("--batch-per-device", type=int, default=1)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--moe-impl", default="capacity")
    p.add_argument("--decode-batches", default="1,8,64")
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU check of the path)")
    args = p.parse_args()
    n = jax.device_count()
    if args.tiny:
        cfg = mj.preset("tiny", num_experts=8, moe_impl=args.moe_impl, capacity_factor=2.0)
        seq, steps, new = 32, 2, 8
    else:
        cfg = mj.preset(
            "mixtral-8x7b",
            num_layers=args.layers,
            dtype="bfloat16",
            param_dtype=args.param_dtype,
            moe_impl=args.moe_impl,
            capacity_factor=1.25,
            max_seq_len=max(args.seq, 4096),
        )
        seq, steps, new = args.seq, args.steps, 64
    expert = math.gcd(n, cfg.num_experts)
    mesh_cfg = (
        sharding.MeshConfig.parse(args.mesh)
        if args.mesh
        else sharding.MeshConfig(fsdp=n // expert, expert=expert)
    )
    mesh = sharding.make_mesh(mesh_cfg)
    peak = matmul_peak_tflops(1024 if args.tiny else 8192)
    row = train(cfg, mesh, args.batch_per_device * n, seq, steps)
    achieved = row["tokens_per_s"] * row["flops_per_token"] / 1e12
    row.update(tflops_per_device=achieved / n, mfu_vs_measured_peak=achieved / n / peak)
    print(row, flush=True)
    jax.clear_caches()
    dec = decode(cfg, mesh, [int(b) for b in args.decode_batches.split(",")], new)
    write_json(
        "full_8x7b.json",
        {
            "env": environment(),
            "mesh": str(mesh_cfg),
            "layers": cfg.num_layers,
            "seq": seq,
            "train": row,
            "decode": dec,
            "matmul_peak_tflops": peak,
        },
    )
    print(f"\n{n} devices, mesh {mesh_cfg}, {cfg.num_layers} layers, seq {seq}")
    print(
        f"train: {row['tokens_per_s_per_device']:,.0f} tokens/s per device "
        f"(MaxText: ~5,960 per H200), MFU {row['mfu_vs_measured_peak']:.1%} of the measured "
        f"peak, peak memory per device (GiB) {row['peak_memory_gib_per_device']}"
    )
    for r in dec:
        print(f"decode batch {r['batch']:>3}: {r['tokens_per_s']:,.1f} tokens/s")


if __name__ == "__main__":
    main()
