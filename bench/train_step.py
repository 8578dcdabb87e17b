"""Training-step throughput of a reduced-depth, full-width Mixtral 8x7B on one GPU.

  PYTHONPATH=. python bench/train_step.py [--layers 2] [--batch 4] [--seq 4096] [--profile]
                                          [--fused-swiglu auto|on|off] [--tiny]
                                          [--layer-loops scan,unrolled] [--set FIELD=VALUE]

bfloat16 compute, float32 master weights and AdamW state, the real train step (CE + router
losses, clipping, AdamW). MFU counts 6 x active matmul parameters + causal attention per token
(`metrics.flops_per_token`), against the bf16 matmul peak measured in the same run and the
989 TFLOP/s datasheet peak. --profile traces 3 more steps of each implementation and lists the
GPU kernels of a step (busy time, span, time per kernel name; `bench/common.kernel_summary`).
--tiny: the tiny preset instead (batch 2 x 64 unless given, no peer, a 1024^3 peak matmul):
the same step end to end on the CPU, for a check that the bench runs (its numbers mean nothing).
--layer-loops: one row per implementation and layer loop (`ComputeConfig.layer_loop`); --set:
any other compute field, for every row.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import mixtral_jax as mj
from bench.common import (
    environment,
    kernel_summary,
    matmul_peak_tflops,
    random_model,
    run_peer,
    synthetic_batch,
    time_train_steps,
    trace_kernels,
    write_json,
)
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.parallel import sharding
from mixtral_jax.train import metrics
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import init_state, make_optimizer, make_train_step, state_shardings


def run(
    moe_impl: str,
    layers: int,
    batch: int,
    seq: int,
    steps: int,
    profile: bool,
    fused: str = "auto",
    preset: str = "mixtral-8x7b",
    layer_loop: str = "scan",
    changes: dict | None = None,
) -> dict:
    cfg = mj.preset(
        preset,
        num_layers=layers,
        dtype="bfloat16",
        param_dtype="float32",
        moe_impl=moe_impl,
        capacity_factor=1.25,
        max_seq_len=seq,
        fused_swiglu=fused,
        layer_loop=layer_loop,
        **(changes or {}),
    )
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    model = random_model(cfg)
    graphdef, params = nnx.graphdef(model), mj.get_params(model)
    del model
    tx = make_optimizer(tc, params)
    state = init_state(params, tx, 0)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])  # one device
    step = make_train_step(
        graphdef, tx, tc, mesh=mesh, shardings=state_shardings(state.params, tx, mesh)
    )
    data = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, batch, seq))
    state, m, step_s, warm = time_train_steps(step, state, data, steps)
    tok_s = batch * seq / step_s
    kernels = None
    if profile:
        box = {"state": state}

        def one_step():
            box["state"], out = step(box["state"], data)
            return out["loss"]

        kernels = kernel_summary(trace_kernels(one_step, reps=3), per=3)
    return {
        "moe_impl": moe_impl,
        "layer_loop": layer_loop,
        "changes": changes or {},
        "fused_swiglu": kernel_plan.resolve(cfg, batch * seq, cached=False).fused_swiglu,
        "layers": layers,
        "batch": batch,
        "seq": seq,
        "step_ms": 1000 * step_s,
        "tokens_per_s": tok_s,
        "loss": float(m["loss"]),
        "flops_per_token": metrics.flops_per_token(cfg, seq),
        "warmup_s": warm,
        "profile": kernels,
    }


def print_profile(summary: dict | None, impl: str, top: int = 40) -> None:
    """The kernels of one step, longest first (ms)."""
    if not summary:
        return
    print(
        f"\n{impl} step kernels: busy {summary['busy_us'] / 1e3:.1f} ms, span "
        f"{summary['span_us'] / 1e3:.1f} ms, {summary['kernels']:.0f} launches"
    )
    for name, v in list(summary["by_name"].items())[:top]:
        print(f"  {v['us'] / 1e3:8.2f} ms {v['count']:6.1f}x  {name[:100]}")


def _field_value(text: str) -> tuple[str, str]:
    """--set's FIELD=VALUE as a pair; argparse turns the error into one usage line."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    return field, value


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 4096 (tiny: 64)")
    p.add_argument("--tiny", action="store_true", help="the tiny preset, on the CPU too")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--impls", default="capacity,dropless")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--profile", action="store_true", help="the GPU kernels of a step")
    p.add_argument(
        "--fused-swiglu", default="auto", choices=("auto", "on", "off"), help="gate+up+SwiGLU"
    )
    p.add_argument("--layer-loops", default="scan", help="comma-separated: scan, unrolled")
    p.add_argument(
        "--set", action="append", default=[], type=_field_value, help="FIELD=VALUE, a compute field"
    )
    args = p.parse_args()
    changes = dict(args.set)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.seq = args.seq or (64 if args.tiny else 4096)
    peer_row = (
        {}
        if args.no_peer or args.tiny
        else run_peer(
            [
                "bench/peer_train_step.py",
                "--layers",
                str(args.layers),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
        )
    )
    print("peer:", peer_row, flush=True)
    peak = matmul_peak_tflops(1024 if args.tiny else 8192)
    rows = []
    variants = [(i, loop) for i in args.impls.split(",") for loop in args.layer_loops.split(",")]
    for impl, loop in variants:
        preset = "tiny" if args.tiny else "mixtral-8x7b"
        row = run(
            impl,
            args.layers,
            args.batch,
            args.seq,
            args.steps,
            args.profile,
            args.fused_swiglu,
            preset,
            loop,
            changes,
        )
        achieved = row["tokens_per_s"] * row["flops_per_token"] / 1e12
        row.update(
            tflops=achieved, mfu_vs_measured_peak=achieved / peak, mfu_vs_989=achieved / 989.0
        )
        rows.append(row)
        print({k: v for k, v in row.items() if k != "profile"}, flush=True)
        print_profile(row["profile"], f"{impl} {loop}")
        jax.clear_caches()
    if "tokens_per_s" in peer_row:
        flops = rows[0]["flops_per_token"]
        peer_tf = peer_row["tokens_per_s"] * flops / 1e12
        rows.append(
            {
                "moe_impl": "peer (transformers)",
                "step_ms": peer_row["step_ms"],
                "tokens_per_s": peer_row["tokens_per_s"],
                "tflops": peer_tf,
                "mfu_vs_measured_peak": peer_tf / peak,
                "mfu_vs_989": peer_tf / 989.0,
            }
        )
    write_json(
        "train_step.json",
        {"env": environment(), "matmul_peak_tflops": peak, "runs": rows, "peer": peer_row},
    )
    print(f"\nmeasured bf16 matmul peak: {peak:.0f} TFLOP/s")
    print(
        f"{'impl':>9} {'loop':>9} {'step ms':>9} {'tok/s':>9} {'TFLOP/s':>8} {'MFU/meas':>9} {'MFU/989':>8}"
    )
    for r in rows:
        print(
            f"{r['moe_impl']:>9} {r.get('layer_loop', ''):>9} {r['step_ms']:>9.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['tflops']:>8.0f} {r['mfu_vs_measured_peak']:>9.1%} {r['mfu_vs_989']:>8.1%}"
        )


if __name__ == "__main__":
    main()
