"""Training-step throughput with expert parallelism vs replicated experts, on all local devices.

  PYTHONPATH=. python bench/ep_train.py [--layers 2] [--batch-per-device 2] [--seq 4096]
  PYTHONPATH=. XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      python bench/ep_train.py --tiny          # the same code path on fake CPU devices

Rows over the N devices (the real train step: CE + router losses, clipping, AdamW, float32
master weights, bf16 compute at full width; every row dropless unless it says capacity):
  replicated      data=N    every device holds every expert (gradients all-reduced)
  expert          expert=N  experts split over devices, tokens moved by the exchange
                            `moe_parallel.Exchange.AUTO` picks: ragged_all_to_all where the
                            backend compiles it (GPU), else the capacity all_to_all
  expert cap 1.25 expert=N  the capacity exchange with capacity factor 1.25 (drops)
  fsdp+expert     fsdp=2, expert=N/2 (N >= 4)
The dropless rows start from the same weights and batch, so their losses agree to bf16 noise:
a check that the exchange is right on real devices. Prints tokens/s per device and writes
$OUT/ep_train.json. Needs N >= 2 (issue 3's 2- and 4-GPU figures; device kinds
nvidia-h200-x2 / -x4).
"""

from __future__ import annotations

import argparse

import jax
from flax import nnx

import mixtral_jax as mj
from bench.common import environment, synthetic_batch, time_train_steps, write_json
from mixtral_jax.config import MoEImpl
from mixtral_jax.moe import expert_parallel as moe_parallel
from mixtral_jax.parallel import sharding
from mixtral_jax.train import trainer
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import make_optimizer, make_train_step, state_shardings


def run(
    cfg: mj.ModelConfig, tc: TrainConfig, mesh_cfg: sharding.MeshConfig, steps: int, label: str
) -> dict:
    mesh = sharding.make_mesh(mesh_cfg)
    params = mj.init_params(cfg, mesh, seed=0)
    tx = make_optimizer(tc, params)
    state = trainer._fresh_state(params, tx, 0, mesh)
    step = make_train_step(
        nnx.graphdef(mj.abstract(cfg)),
        tx,
        tc,
        mesh=mesh,
        shardings=state_shardings(params, tx, mesh),
    )
    b, t = tc.batch_size, tc.seq_len
    batch = trainer._on_mesh(synthetic_batch(cfg.vocab_size, b, t), mesh, leading=1)
    state, m, step_s, warm = time_train_steps(step, state, batch, steps)
    exchange = "-"
    if mesh.shape["expert"] > 1:
        factor = cfg.compute.capacity_factor if cfg.compute.moe_impl == MoEImpl.CAPACITY else None
        exchange = moe_parallel.resolve_exchange("auto", mesh, factor).value
    n = jax.device_count()
    return {
        "row": label,
        "mesh": str(mesh_cfg),
        "moe_impl": cfg.compute.moe_impl.value,
        "exchange": exchange,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": b * t / step_s,
        "tokens_per_s_per_device": b * t / step_s / n,
        "loss": float(m["loss"]),
        "dropped_fraction": float(jax.numpy.mean(m["dropped_fraction"])),
        "warmup_s": warm,
    }


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
        cfg = mj.preset("tiny", moe_impl="dropless")
        seq, steps = 32, 2
    else:
        cfg = mj.preset(
            "mixtral-8x7b",
            num_layers=args.layers,
            dtype="bfloat16",
            param_dtype="float32",
            moe_impl="dropless",
            max_seq_len=args.seq,
        )
        seq, steps = args.seq, args.steps
    capped = cfg.replace(moe_impl="capacity", capacity_factor=1.25)
    tc = TrainConfig(steps=1000, batch_size=args.batch_per_device * n, seq_len=seq, warmup_steps=10)
    variants = [
        ("replicated", cfg, sharding.MeshConfig(data=n)),
        ("expert", cfg, sharding.MeshConfig(expert=n)),
        ("expert cap 1.25", capped, sharding.MeshConfig(expert=n)),
    ]
    if n >= 4:
        variants.append(("fsdp+expert", cfg, sharding.MeshConfig(fsdp=2, expert=n // 2)))
    rows = []
    for label, model_cfg, mesh_cfg in variants:
        rows.append(run(model_cfg, tc, mesh_cfg, steps, label))
        print(rows[-1], flush=True)
        jax.clear_caches()
    write_json(
        "ep_train.json",
        {
            "env": environment(),
            "layers": cfg.num_layers,
            "seq": seq,
            "batch": tc.batch_size,
            "runs": rows,
        },
    )
    print(f"\n{n} devices, {cfg.num_layers} layers, batch {tc.batch_size} x {seq}")
    print(
        f"{'row':>16} {'mesh':>44} {'exchange':>9} {'step ms':>9} {'tok/s/device':>13} "
        f"{'loss':>8} {'dropped':>8}"
    )
    for r in rows:
        print(
            f"{r['row']:>16} {r['mesh']:>44} {r['exchange']:>9} {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s_per_device']:>13.0f} {r['loss']:>8.4f} "
            f"{r['dropped_fraction']:>8.2%}"
        )
    dropless = [r["loss"] for r in rows if r["moe_impl"] == "dropless"]
    spread = max(dropless) - min(dropless)
    print(f"dropless rows' loss spread: {spread:.2e} (same weights and batch: bf16 noise only)")


if __name__ == "__main__":
    main()
