"""Issue 19: decode speed with int8 / int4 experts beside bf16, in one run on one GPU, and
Mixtral 8x22B with int4 experts resident on one H200.

  python3 bench/quant_decode.py [--layers 32] [--batches 1,64] [--new 128] [--formats
      bf16,int8,int4] [--group-size 128] [--no-8x22b] [--set quantized_impl=dequantize]
      [--dequant auto|float32,ptx] [--profile]
  JAX_PLATFORMS=cpu python3 bench/quant_decode.py --tiny     # the same code at a tiny size

Full 8x7B widths (32 layers): for each format the weights are drawn on the device one layer at
a time from the same keys (the bf16 values are equal across formats) and, for int8 / int4,
quantized there as they are drawn (`model/quantized.py`, group 128 for int4, per output
channel for int8), so no format ever holds another's weights and the bf16 stack of a quantized
leaf never exists whole. Attention, router, embedding and LM head stay bf16. Decode tokens/s
through `Generator` (16-token random prompts, --new tokens, the second run timed), as
bench/decode.py, beside the floor: the bytes one step must read at the copy bandwidth measured
in the same run. Then 8x22B (56 layers, D 6144, F 16384) with int4 experts, batch 1.
--dequant runs each quantized format (and 8x22B) once per way of making its tiles
(`weight_tiles.DEQUANT`: "auto", the default, PTX for int4 and float32 for int8; "float32";
or "ptx", GPU only); each run names it.
--profile adds each row's GPU kernels per decode step (busy time, launches, time per kernel
name). Prints one JSON line last and writes $OUT/quant_decode.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from bench.decode import decode_row, profile_decode
from mixtral_jax.generate import Generator
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels import weight_tiles
from mixtral_jax.model import quantized

FORMATS = {"bf16": (16, None), "int8": (8, None), "int4": (4, 128)}  # bits, group (--group-size)


def format_config(base: mj.ModelConfig, name: str, group_size: int) -> mj.ModelConfig:
    """`base` with the experts of format `name` (int4 in groups of `group_size`)."""
    bits, group = FORMATS[name]
    if bits == 16:
        return base
    return base.replace(expert_bits=bits, quant_group_size=None if group is None else group_size)


def random_params(cfg: mj.ModelConfig, seed: int = 0) -> dict:
    """Random N(0, 0.02^2) parameters of the (possibly quantized) `cfg` made on the device:
    stacked leaves one layer at a time (jax.lax.map), quantized leaves drawn in bf16 and
    quantized layer by layer, norms ones. Leaf keys depend on the float tree only, so every
    format gets the same float values."""
    float_cfg = quantized.float_config(cfg)
    targets = quantized.quantized_leaves(cfg)
    flat = jax.tree_util.tree_flatten_with_path(mj.param_shapes(float_cfg))[0]
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out: dict = {}
    for key, (path, leaf) in zip(keys, flat):
        names = tuple(p.key for p in path)
        node = out
        for n in names[:-1]:
            node = node.setdefault(n, {})
        if names[-1] == "scale":  # RMSNorm scales
            node["scale"] = jnp.ones(leaf.shape, leaf.dtype)
            continue
        bits = targets.get(names[1:]) if names[0] == "layers" else None
        made = _draw(key, leaf.shape, leaf.dtype, cfg, names[-1], bits)
        if bits is None:
            node[names[-1]] = made
        else:
            node[names[-1]], node[names[-1] + "_scale"] = made
    return out


def _draw(key, shape, dtype, cfg, name, bits):
    def one(k, shape=shape):
        w = (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        return w if bits is None else quantized.quantize_weight(cfg, name, w, bits)

    if len(shape) < 3:  # embedding, LM head: whole
        return jax.jit(one)(key)
    layers = jax.random.split(key, shape[0])
    return jax.jit(lambda ks: jax.lax.map(lambda k: one(k, shape[1:]), ks))(layers)


def step_bytes(cfg: mj.ModelConfig, batch: int) -> float:
    """Weight bytes one decode step reads: bf16 attention, router and LM head; the experts the
    batch touches in expectation (E (1 - (1 - k/E)^B) per layer) as stored (codes + scales)."""
    d, f, e, k = cfg.embed_dim, cfg.hidden_dim, cfg.num_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    if cfg.expert_bits == 16:
        per_weight = 2.0
    else:  # codes, and scales: 1 per group, or per output channel (F, F, D of 3 D F weights)
        group = cfg.quant_group_size
        scale = np.dtype(cfg.quant_scale_dtype).itemsize
        share = (2 * f + d) / (3 * d * f) if group is None else 1 / group
        per_weight = cfg.expert_bits / 8 + scale * share
    attention = 2.0 * (d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + d * e)
    return cfg.num_layers * (attention + touched * 3 * d * f * per_weight) + 2.0 * (
        cfg.vocab_size * d
    )


def measure(
    cfg: mj.ModelConfig, batches: list[int], new: int, bandwidth: float, profile: bool = False
) -> dict:
    """Builds the model on the device, decodes, frees it: one row per batch (with `profile`,
    the GPU kernels of its decode steps, `bench.decode.profile_decode`)."""
    start = time.perf_counter()
    model = mj.from_params(cfg, random_params(cfg))
    built = time.perf_counter() - start
    generator = Generator(model, chunk=16)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        prompts = [list(map(int, rng.integers(3, cfg.vocab_size, 16))) for _ in range(batch)]
        row = decode_row(generator, prompts, new, step_bytes(cfg, batch), bandwidth)
        rows.append({**row, "plan": str(kernel_plan.resolve(cfg, batch, cached=True, queries=1))})
        if profile:
            rows[-1]["profile"] = profile_decode(generator, batch=batch)
        print(json.dumps({"format": _name(cfg), **rows[-1]}), flush=True)
    weights = sum(x.nbytes for x in jax.tree.leaves(mj.get_params(model)))
    del generator, model
    gc.collect()
    jax.clear_caches()
    return {"format": _name(cfg), "build_s": built, "weight_bytes": weights, "decode": rows}


def _name(cfg: mj.ModelConfig) -> str:
    if cfg.expert_bits == 16:
        return "bf16"
    group = "" if cfg.quant_group_size is None else f" g{cfg.quant_group_size}"
    return f"int{cfg.expert_bits}{group}"


def base_configs(args) -> tuple[mj.ModelConfig, mj.ModelConfig | None]:
    """(the 8x7B-width model, the 8x22B one or None), bf16, with --set compute changes."""
    common = {"dtype": "bfloat16", "param_dtype": "bfloat16", "max_seq_len": 4096}
    common.update(dict(item.split("=", 1) for item in args.set))
    if args.tiny:  # CPU check of this script: tiny widths
        tiny = mj.preset("tiny", **common)
        return tiny, tiny.replace(num_layers=3) if args.big else None
    small = mj.preset("mixtral-8x7b", num_layers=args.layers, **common)
    return small, mj.preset("mixtral-8x22b", **common) if args.big else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--formats", default="bf16,int8,int4", help="'' for the 8x22B run alone")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--no-8x22b", dest="big", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny widths (a CPU check)")
    p.add_argument("--set", action="append", default=[], help="compute setting (repeatable)")
    p.add_argument("--dequant", default="auto", help="weight_tiles.DEQUANT values, in turn")
    p.add_argument("--profile", action="store_true", help="GPU kernels of each batch's steps")
    args = p.parse_args(argv)
    bad = [d for d in args.dequant.split(",") if d not in weight_tiles.DEQUANT_CHOICES]
    if bad:
        p.error(f"--dequant {bad[0]!r}: must be one of {', '.join(weight_tiles.DEQUANT_CHOICES)}")
    from bench.common import copy_bandwidth_tbs, environment, timed, write_json

    if args.tiny:  # a 64 MB copy: only the script's logic is checked at this size
        x = jnp.ones((1 << 25,), jnp.bfloat16)
        bandwidth = 2 * x.nbytes / timed(jax.jit(lambda x: x + 1), x, repeats=3) / 1e12
    else:
        bandwidth = copy_bandwidth_tbs()
    small, big = base_configs(args)
    batches = [int(b) for b in args.batches.split(",")]
    dequants = args.dequant.split(",")

    def run(cfg, name, rows, dequant):
        weight_tiles.DEQUANT = dequant
        run_cfg = format_config(cfg, name, args.group_size)
        result = measure(run_cfg, rows, args.new, bandwidth, args.profile)
        return result if name == "bf16" else {**result, "dequant": dequant}

    runs = [
        run(small, name, batches, dequant)
        for name in args.formats.split(",")
        if name
        for dequant in (dequants[:1] if name == "bf16" else dequants)
    ]
    big_run = None
    if big is not None:
        big_runs = [run(big, "int4", [1], dequant) for dequant in dequants]
        big_run = big_runs[0] if len(big_runs) == 1 else big_runs
    payload = {
        "env": environment(),
        "copy_bandwidth_tbs": bandwidth,
        "layers": small.num_layers,
        "runs": runs,
        "mixtral_8x22b_int4": big_run,
    }
    write_json("quant_decode.json", payload)
    print(json.dumps(payload), flush=True)
    return payload


if __name__ == "__main__":
    main()
