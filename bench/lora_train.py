"""LoRA fine-tuning of the full Mixtral 8x7B on one GPU: peak memory and throughput, over a
bf16 base or a quantized one (QLoRA: int8 / int4 experts, optionally attention too).

  python3 bench/lora_train.py [--layers 32] [--seq 4096 | --seqs 2048,4096,8192] [--batch 1]
      [--rank 16] [--steps 5] [--bits 16|8|4] [--group-size 128] [--attention]
  JAX_PLATFORMS=cpu python3 bench/lora_train.py --tiny      # the same code at a tiny size

The frozen base is drawn on the device: bf16 one layer slice at a time (`bench/common.py`), or,
with --bits 8 / 4, each layer drawn in bf16 and quantized there as it is drawn
(`bench/quant_decode.py`'s `random_params`: int8 per output channel, int4 in groups of
--group-size; --attention quantizes q/k/v/o too), so the bf16 stack of a quantized leaf never
exists whole. Rank-r adapters (float32, alpha = 2r) on q/k/v/o and every expert's
w_gate/w_up/w_down, the real train step (CE + router losses, clipping, AdamW over the adapters
alone; the base a non-donated input with no gradient and no moments: `train/trainable.py`),
dropless MoE, remat of each layer. A quantized base runs the kernels the plan picks for it
(on an H200 the quantized grouped matmul; its backward dequantizes each expert matrix again for
d x = d y W^T: `kernels/gmm_quant.py`).

TFLOP/s counts the base's forward and backward work as the step does it: a frozen matrix costs
its forward product and the product for the input's gradient (4 x active matmul parameters per
token, not 6: no weight gradient), plus causal attention forward and backward
(`metrics.flops_per_token`'s 6 L T N H) and 6 x the adapters' active parameters (the k chosen
experts' and attention's); remat's recomputation and dequantization are not counted. MFU is
against the bf16 matmul peak measured in the same run.

Each sequence length of --seqs (ascending) is tried on the same base: one JSON line each, with
the step time, TFLOP/s and the device's peak bytes in use so far (the peak of the longest that
ran), or `"fits": false` and the error's first line when it does not fit (out of memory), after
which longer ones are not tried. The last line is the summary (the longest that fit); it is
also written to $OUT/lora_train.json.
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
from bench import quant_decode
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


def build(cfg: mj.ModelConfig, lcfg: lora.LoraConfig, tc: TrainConfig, make_base=None):
    """(step, fresh_state(), frozen params) on the first device; `make_base(cfg)` the base
    model (default `base_model`). One step function serves every sequence length (jit traces
    each shape); `fresh_state()` makes a new state (the step donates its input state)."""
    model = (make_base or base_model)(cfg)
    base = mj.get_params(model)
    del model
    part = trainable.Partition(lcfg=lcfg, rows={})
    graphdef = nnx.graphdef(trainable.abstract_model(cfg, part))
    adapters = lora.init_adapters(cfg, lcfg, seed=0)
    tx = make_optimizer(tc, adapters)
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    step = make_train_step(
        graphdef,
        tx,
        tc,
        mesh=mesh,
        shardings=state_shardings(init_state(adapters, tx, 0).params, tx, mesh),
        frozen=(part, base),
    )
    return step, lambda: init_state(lora.init_adapters(cfg, lcfg, seed=0), tx, 0), base


def base_model(cfg: mj.ModelConfig) -> mj.Mixtral:
    """The random base drawn on the device: bf16 slices, or quantized layer by layer."""
    if cfg.quantized:
        return mj.from_params(cfg, quant_decode.random_params(cfg))
    return random_model(cfg)


def model_config(layers: int, seq: int, remat: str, bits: int, group, attention: bool, tiny=False):
    """The benchmarked model: Mixtral 8x7B widths (or tiny ones), bf16, dropless, `remat`;
    experts (and with `attention` the projections) stored in `bits` (16: bf16)."""
    common = {
        "num_layers": layers,
        "dtype": "bfloat16",
        "param_dtype": "bfloat16",
        "moe_impl": "dropless",
        "remat": remat,
        "max_seq_len": max(seq, 128),
    }
    cfg = mj.preset("tiny" if tiny else "mixtral-8x7b", **common)
    if bits == 16:
        return cfg
    if group is None and bits == 4:
        group = 32 if tiny else 128
    return cfg.replace(
        expert_bits=bits, attention_bits=bits if attention else 16, quant_group_size=group
    )


def run(layers: int, seq: int, batch: int, rank: int, steps: int, remat: str, peak: bool) -> dict:
    """One sequence length over a bf16 base (the earlier command line's run)."""
    cfg = model_config(layers, seq, remat, 16, None, False)
    return run_config(cfg, seq, batch, rank, steps, peak)


def run_config(
    cfg, seq: int, batch: int, rank: int, steps: int, peak: bool, make_base=None
) -> dict:
    lcfg = lora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    step, fresh_state, base = build(cfg, lcfg, tc, make_base)
    row = measure(step, fresh_state(), base, cfg, lcfg, seq, batch, steps)
    if peak:
        row["matmul_peak_tflops"] = matmul_peak_tflops()
        row["mfu_vs_measured_peak"] = row["tflops"] / row["matmul_peak_tflops"]
    return row


def measure(step, state, base, cfg, lcfg, seq: int, batch: int, steps: int) -> dict:
    """Times `steps` train steps at [batch, seq] (after 2 warm-up steps): one result row."""
    data = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, batch, seq))
    state, m, step_s, warm = time_train_steps(step, state, data, steps)
    flops = lora_flops_per_token(cfg, lcfg, seq)
    tflops = flops["total"] * batch * seq / step_s / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "layers": cfg.num_layers,
        "seq": seq,
        "batch": batch,
        "rank": lcfg.rank,
        "remat": cfg.compute.remat.value,
        "expert_bits": cfg.expert_bits,
        "attention_bits": cfg.attention_bits,
        "quant_group_size": cfg.quant_group_size,
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


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


def _one_line(err: BaseException, where: str = "") -> str:
    """ "out of memory: <first line>" (or the error's type), `where` it happened if given."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    kind = "out of memory" if is_out_of_memory(err) else type(err).__name__
    return f"{kind}{' building the ' + where if where else ''}: {first}"


def sweep(cfg, lcfg, tc, seqs: list[int], batch: int, steps: int, make_base=None) -> list[dict]:
    """`measure` at each of `seqs` (ascending) on one base; a length that does not fit gives
    {"seq", "fits": False, "error"} and ends the sweep (a longer one would not fit either)."""
    try:
        step, fresh_state, base = build(cfg, lcfg, tc, make_base)
    except Exception as err:  # noqa: BLE001 - the base itself does not fit: one line
        row = {"seq": min(seqs), "batch": batch, "fits": False, "error": _one_line(err, "base")}
        print(json.dumps({"bench": "lora_train", **row}), flush=True)
        return [row]
    rows = []
    for seq in sorted(seqs):
        try:
            row = {"fits": True, **measure(step, fresh_state(), base, cfg, lcfg, seq, batch, steps)}
        except Exception as err:  # noqa: BLE001 - reported as one line, not a traceback
            row = {"seq": seq, "batch": batch, "fits": False, "error": _one_line(err)}
        print(json.dumps({"bench": "lora_train", **row}), flush=True)
        rows.append(row)
        if not row["fits"]:
            break
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--seqs", help="comma list of sequence lengths to try (overrides --seq)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="full", choices=["none", "full", "save_dots"])
    p.add_argument("--bits", type=int, default=16, choices=[16, 8, 4], help="base experts")
    p.add_argument("--group-size", type=int, help="rows per scale (int4: 128, tiny 32)")
    p.add_argument("--attention", action="store_true", help="quantize q/k/v/o too")
    p.add_argument("--tiny", action="store_true", help="tiny widths (a CPU check)")
    args = p.parse_args(argv)
    seqs = [int(x) for x in args.seqs.split(",")] if args.seqs else [args.seq]
    if args.tiny:
        args.layers = min(args.layers, 2)
    cfg = model_config(
        args.layers, max(seqs), args.remat, args.bits, args.group_size, args.attention, args.tiny
    )
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS)
    tc = TrainConfig(steps=1000, batch_size=args.batch, seq_len=max(seqs), warmup_steps=10)
    rows = sweep(cfg, lcfg, tc, seqs, args.batch, args.steps)
    fit = [r for r in rows if r["fits"]]
    summary = {
        "bench": "lora_train_summary",
        **environment(),
        "layers": cfg.num_layers,
        "expert_bits": cfg.expert_bits,
        "attention_bits": cfg.attention_bits,
        "batch": args.batch,
        "rank": args.rank,
        "targets": list(TARGETS),
        "seqs": [{k: r.get(k) for k in SUMMARY_KEYS} for r in rows],
        "longest_seq_that_fits": fit[-1]["seq"] if fit else None,
    }
    if fit:
        summary["base_bytes"] = fit[-1]["base_bytes"]
        summary["matmul_peak_tflops"] = matmul_peak_tflops(512 if args.tiny else 8192)
        summary["mfu_vs_measured_peak"] = fit[-1]["tflops"] / summary["matmul_peak_tflops"]
    print(json.dumps(summary))
    write_json("lora_train.json", summary)
    return 0 if fit else 1


SUMMARY_KEYS = ("seq", "fits", "step_ms", "tokens_per_s", "tflops", "peak_bytes_in_use", "error")


if __name__ == "__main__":
    sys.exit(main())
