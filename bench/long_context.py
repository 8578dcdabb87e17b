"""Long prompts through `Generator` on one GPU: the full Mixtral 8x7B (random bf16 weights made on
the device) at prompts of 2k, 8k and 32k tokens, batch 1.

  PYTHONPATH=. python bench/long_context.py [--layers 32] [--prompts 2048,8192,32768]
      [--new 128] [--prefill-chunk 4096] [--bandwidth-tbs 4.3]
  PYTHONPATH=. JAX_PLATFORMS=cpu python bench/long_context.py --preset tiny   # the code path

Per prompt length, each measured on the second `generate` (the first compiles):
  time to first token (chunked prefill: `--prefill-chunk` tokens per compiled call), and its
    share of the bf16 matmul peak measured in the same run, counting the prefill's useful FLOPs:
    2 x active parameters (the embedding lookup left out) x prompt tokens, plus causal attention
    (QK^T and PV: 4 x N x H per query-key pair a query sees, its window if any, every layer);
  decode tokens/s with that cache (`--new` tokens, `chunk` steps per compiled call) and its share
    of the floor: each step reads the weights it uses (bench/decode.step_bytes: attention, router,
    the experts a batch-1 token touches, the LM head) and the KV bytes of the tokens in the cache
    (prompt + half the new tokens, k and v of every layer), at `--bandwidth-tbs`;
  peak GPU memory: the device's memory_stats peak_bytes_in_use after that length (a running peak
    since the process started, so lengths run shortest first), beside the weight and cache bytes.
A prompt is cut to the model's context minus `--new` (32,768 - 128 for Mixtral). Writes
$OUT/long_context.json and prints a table.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

import mixtral_jax as mj
from bench.common import (
    environment,
    loaded_random_model,
    matmul_peak_tflops,
    print_kernel_rows,
    random_model,
    write_json,
)
from bench.decode import profile_decode, step_bytes
from mixtral_jax.generate import Generator
from mixtral_jax.generate.sampler import PREFILL_CHUNK, prompt_width
from mixtral_jax.kernels import plan as kernel_plan


def attended_pairs(tokens: int, window: int | None) -> int:
    """Query-key pairs of causal attention over `tokens` tokens (query i sees min(i+1, W) keys)."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def prefill_flops(cfg: mj.ModelConfig, tokens: int) -> float:
    """Useful prefill FLOPs of one prompt: 2 x active parameters (embedding lookup excluded) per
    token, plus 4 x N x H per attended query-key pair and layer."""
    matmul = 2.0 * (cfg.active_param_count - cfg.vocab_size * cfg.embed_dim) * tokens
    pairs = attended_pairs(tokens, cfg.sliding_window)
    return matmul + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs


def kv_bytes(cfg: mj.ModelConfig, tokens: int, itemsize: int = 2) -> float:
    """Bytes of k and v of `tokens` cached tokens (a window caps them), every layer."""
    kept = tokens if cfg.sliding_window is None else min(tokens, cfg.sliding_window)
    return 2.0 * cfg.num_layers * kept * cfg.num_kv_heads * cfg.head_dim * itemsize


def peak_memory_bytes() -> int | None:
    """The device's peak bytes in use so far (None where the backend keeps no statistics)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def weight_bytes(model: mj.Mixtral) -> int:
    """Bytes of the model's parameters on the device."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def run_length(generator: Generator, prompt: list[int], new: int, bandwidth: float, peak: float):
    """One prompt length, timed on the second generate: a result row."""
    cfg = generator.cfg
    for _ in range(2):  # the first call compiles the chunk, the decode loop
        result = generator.generate([prompt], max_new_tokens=new, eos_id=None)
    n = len(prompt)
    ttft = result.time_to_first_token_s
    flops = prefill_flops(cfg, n)
    tok_s = result.decode_tokens / result.decode_s
    floor_s = (step_bytes(cfg, 1) + kv_bytes(cfg, n + new // 2)) / (bandwidth * 1e12)
    peak_bytes = peak_memory_bytes()
    return {
        "prompt_tokens": n,
        "prompt_width": result.prompt_bucket,
        "prefill_chunks": -(-result.prompt_bucket // generator.prefill_chunk),
        "ttft_s": ttft,
        "prefill_tflops": flops / ttft / 1e12,
        "prefill_share_of_matmul_peak": flops / ttft / 1e12 / peak,
        "decode_tokens": result.decode_tokens,
        "decode_tokens_per_s": tok_s,
        "decode_step_ms": 1000 / tok_s,
        "decode_floor_step_ms": 1000 * floor_s,
        "decode_share_of_floor": floor_s * tok_s,
        "kv_cache_bytes": kv_bytes(cfg, result.prompt_bucket + new),
        "peak_memory_bytes": peak_bytes,
    }


def print_table(rows: list[dict], peak: float, bandwidth: float, weights: int) -> None:
    print(
        f"\nmatmul peak {peak:.0f} TFLOP/s, floor bandwidth {bandwidth:.2f} TB/s, "
        f"weights {weights / 2**30:.1f} GiB"
    )
    print(
        f"{'prompt':>7} {'chunks':>6} {'TTFT ms':>9} {'TFLOP/s':>8} {'of peak':>8} "
        f"{'tok/s':>8} {'step ms':>8} {'floor ms':>8} {'of floor':>8} {'peak GiB':>9}"
    )
    for r in rows:
        gib = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
        print(
            f"{r['prompt_tokens']:>7} {r['prefill_chunks']:>6} {r['ttft_s'] * 1000:>9.0f} "
            f"{r['prefill_tflops']:>8.1f} {r['prefill_share_of_matmul_peak']:>8.1%} "
            f"{r['decode_tokens_per_s']:>8.1f} {r['decode_step_ms']:>8.2f} "
            f"{r['decode_floor_step_ms']:>8.2f} {r['decode_share_of_floor']:>8.1%} {gib:>9}"
        )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=None, help="default: the preset's")
    p.add_argument("--prompts", default=None, help="default 2048,8192,32768 (tiny: 64,128,224)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 128, tiny 32)")
    p.add_argument(
        "--prefill-chunk", type=int, default=None, help="default: Generator's (tiny: 64)"
    )
    p.add_argument("--decode-chunk", type=int, default=16)
    p.add_argument("--bandwidth-tbs", type=float, default=4.3)
    p.add_argument("--peak-n", type=int, default=None, help="matmul size (default 8192, tiny 256)")
    p.add_argument("--profile", action="store_true", help="kernels of a decode step, last length")
    p.add_argument(
        "--through-loader",
        action="store_true",
        help="place the weights with the product's loader (random host slices) instead of "
        "drawing them on the device",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="compute setting, e.g. decode_attention_impl=off (repeatable)",
    )
    args = p.parse_args()
    tiny = args.preset == "tiny"
    prompts = args.prompts or ("64,128,224" if tiny else "2048,8192,32768")
    new = args.new or (32 if tiny else 128)
    chunk = args.prefill_chunk or (64 if tiny else PREFILL_CHUNK)
    changes = {"dtype": "bfloat16", "param_dtype": "bfloat16"}
    if args.layers is not None:
        changes["num_layers"] = args.layers
    changes.update(item.split("=", 1) for item in args.set)
    cfg = mj.preset(args.preset, **changes)
    lengths = sorted({min(int(n), cfg.max_seq_len - new) for n in prompts.split(",")})

    peak = matmul_peak_tflops(args.peak_n or (256 if tiny else 8192))
    start = time.perf_counter()
    model = loaded_random_model(cfg) if args.through_loader else random_model(cfg)
    weights = weight_bytes(model)
    build_s = time.perf_counter() - start
    how = "placed by the loader" if args.through_loader else "built on device"
    print(f"model {how} in {build_s:.0f} s ({weights / 1e9 / build_s:.2f} GB/s)", flush=True)
    generator = Generator(model, chunk=args.decode_chunk, prefill_chunk=chunk)
    plans = {
        "prefill_chunk": kernel_plan.resolve(cfg, chunk, cached=True, queries=chunk),
        "decode": kernel_plan.resolve(cfg, 1, cached=True, queries=1),
    }
    for name, plan in plans.items():
        print(f"kernel plan, {name}: {plan}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for n in lengths:
        prompt = list(map(int, rng.integers(3, cfg.vocab_size, n)))
        assert prompt_width(n, chunk) >= n
        rows.append(run_length(generator, prompt, new, args.bandwidth_tbs, peak))
        print(rows[-1], flush=True)
    profile = profile_decode(generator, prompt, calls=2) if args.profile else None
    write_json(
        "long_context.json",
        {
            "env": environment(),
            "config": {
                "preset": args.preset,
                "layers": cfg.num_layers,
                "new_tokens": new,
                "prefill_chunk": chunk,
                "decode_chunk": args.decode_chunk,
                "bandwidth_tbs": args.bandwidth_tbs,
                "through_loader": args.through_loader,
                "build_s": build_s,
            },
            "matmul_peak_tflops": peak,
            "weight_bytes": weights,
            "kernel_plans": {k: str(v) for k, v in plans.items()},
            "rows": rows,
            "decode_profile": profile,
        },
    )
    print_table(rows, peak, args.bandwidth_tbs, weights)
    if profile:
        print(
            f"\ndecode step over {profile['cache_tokens']} cached tokens: busy "
            f"{profile['busy_us']:.0f} us, span {profile['span_us']:.0f} us, "
            f"{profile['kernels']:.0f} launches"
        )
        print_kernel_rows(profile, 25)


if __name__ == "__main__":
    main()
