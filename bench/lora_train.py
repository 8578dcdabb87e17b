"""LoRA fine-tuning of the full Mixtral 8x7B on one GPU: peak memory and throughput.

  python3 bench/lora_train.py [--layers 32] [--seq 4096] [--batch 1] [--rank 16] [--steps 5]

The frozen base in bfloat16 (drawn on the device, one layer slice at a time: `bench/common.py`),
rank-r adapters (float32, alpha = 2r) on q/k/v/o and every expert's w_gate/w_up/w_down, the real
train step (CE + router losses, clipping, AdamW over the adapters alone; the base a non-donated
input with no gradient and no moments: `train/trainable.py`), dropless MoE, remat of each layer.

TFLOP/s counts the base's forward and backward work as the step does it: a frozen matrix costs
its forward product and the product for the input's gradient (4 x active matmul parameters per
token, not 6: no weight gradient), plus causal attention forward and backward
(`metrics.flops_per_token`'s 6 L T N H) and 6 x the adapters' active parameters (the k chosen
experts' and attention's); remat's recomputation is not counted. MFU is against the bf16 matmul
peak measured in the same run. Prints one JSON line (and writes $OUT/lora_train.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

import mixtral_jax as mj
from bench.common import (
    environment,
    matmul_peak_tflops,
    random_model,
    synthetic_batch,
    time_train_steps,
    write_json,
)
from mixtral_jax.model import lora
from mixtral_jax.parallel import sharding
from mixtral_jax.train import trainable
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import (
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "w_gate", "w_up", "w_down")


def lora_flops_per_token(cfg: mj.ModelConfig, lcfg: lora.LoraConfig, seq: int) -> dict:
    """Forward + backward FLOPs per token of a LoRA step over a frozen base (see docstring)."""
    norms = (2 * cfg.num_layers + 1) * cfg.embed_dim
    base = cfg.active_param_count - cfg.vocab_size * cfg.embed_dim - norms
    attention = 6 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
    shapes = lora.adapter_shapes(cfg, lcfg)["layers"]
    active = 0
    for target in lcfg.targets:
        module = lora.TARGETS[target][0]
        size = sum(math.prod(shapes[module][n]) for n in lora.factor_names(target))
        expert = target in lora.EXPERT_TARGETS  # only the k chosen of E experts run
        active += size * cfg.num_experts_per_tok // cfg.num_experts if expert else size
    return {
        "base": 4.0 * base + attention,
        "adapters": 6.0 * active,
        "total": 4.0 * base + attention + 6.0 * active,
        "adapter_params_active": active,
    }


def build(cfg: mj.ModelConfig, lcfg: lora.LoraConfig, tc: TrainConfig, make_base=random_model):
    """(step, state, frozen params) on the first device; `make_base(cfg)` the base model."""
    model = make_base(cfg)
    graphdef_base, base = nnx.graphdef(model), mj.get_params(model)
    del model, graphdef_base
    part = trainable.Partition(lcfg=lcfg, rows={})
    graphdef = nnx.graphdef(trainable.abstract_model(cfg, part))
    adapters = lora.init_adapters(cfg, lcfg, seed=0)
    tx = make_optimizer(tc, adapters)
    state = init_state(adapters, tx, 0)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    step = make_train_step(
        graphdef,
        tx,
        tc,
        mesh=mesh,
        shardings=state_shardings(state.params, tx, mesh),
        frozen=(part, base),
    )
    return step, state, base


def run(layers: int, seq: int, batch: int, rank: int, steps: int, remat: str, peak: bool) -> dict:
    cfg = mj.preset(
        "mixtral-8x7b",
        num_layers=layers,
        dtype="bfloat16",
        param_dtype="bfloat16",
        moe_impl="dropless",
        remat=remat,
        max_seq_len=max(seq, 128),
    )
    return run_config(cfg, seq, batch, rank, steps, peak)


def run_config(
    cfg, seq: int, batch: int, rank: int, steps: int, peak: bool, make_base=random_model
) -> dict:
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    step, state, base = build(cfg, lcfg, tc, make_base)
    data = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, batch, seq))
    state, m, step_s, warm = time_train_steps(step, state, data, steps)
    flops = lora_flops_per_token(cfg, lcfg, seq)
    tflops = flops["total"] * batch * seq / step_s / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    row = {
        "layers": cfg.num_layers,
        "seq": seq,
        "batch": batch,
        "rank": rank,
        "targets": list(TARGETS),
        "remat": cfg.compute.remat.value,
        "base_bytes": sum(x.nbytes for x in jax.tree.leaves(base)),
        "adapter_params": sum(x.size for x in jax.tree.leaves(state.params)),
        "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
        "step_ms": 1000 * step_s,
        "tokens_per_s": batch * seq / step_s,
        "flops_per_token": flops,
        "tflops": tflops,
        "loss": float(m["loss"]),
        "finite": bool(m["finite"]),
        "warmup_s": warm,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
        "bytes_limit": stats.get("bytes_limit"),
    }
    if peak:
        row["matmul_peak_tflops"] = matmul_peak_tflops()
        row["mfu_vs_measured_peak"] = tflops / row["matmul_peak_tflops"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    args = p.parse_args(argv)
    row = run(args.layers, args.seq, args.batch, args.rank, args.steps, args.remat, peak=True)
    payload = {"bench": "lora_train", **environment(), **row}
    print(json.dumps(payload))
    write_json("lora_train.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
