"""Decode speed of the full Mixtral 8x7B (random bf16 weights) on one GPU, beside the floor.

  PYTHONPATH=. python bench/decode.py [--layers 32] [--batches 1,8,64] [--new 128] [--peer]
      [--profile]

--peer runs transformers' MixtralForCausalLM generate on the same shapes first, in its own
process (bench/peer_decode.py). --profile traces batch-1 decode steps and lists the GPU kernels
of one step (device time per kernel, launches, busy time against the step's span).

The floor: each decode step must read the weights it uses once: attention and router of every
layer, the experts the batch touches (8 x (1 - (3/4)^B) of 8 per layer, in expectation, for
top-2), the LM head; at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from bench.common import (
    copy_bandwidth_tbs,
    environment,
    kernel_summary,
    print_kernel_rows,
    random_model,
    run_peer,
    trace_kernels,
    write_json,
)
from mixtral_jax.generate import Generator, SamplingParams
from mixtral_jax.generate.sampler import left_pad, prompt_width
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.model import moe as moe_block
from mixtral_jax.moe import ops as moe_ops


def step_bytes(cfg: mj.ModelConfig, batch: int) -> float:
    """Weight bytes one decode step reads (bf16), experts counted by expected distinct use."""
    d, f, e, k = cfg.embed_dim, cfg.hidden_dim, cfg.num_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    attention = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + d * e
    per_layer = attention + touched * 3 * d * f
    return 2.0 * (cfg.num_layers * per_layer + cfg.vocab_size * d)


def decode_row(generator: Generator, prompts, new: int, floor_bytes: float, bandwidth: float):
    """Batch decode of `prompts` (a second run, timed without compilation) beside the floor of
    reading `floor_bytes` a step at `bandwidth` TB/s: tokens/s, ms per step, floor ms, share."""
    for _ in range(2):
        result = generator.generate(prompts, max_new_tokens=new, eos_id=None)
    batch = len(prompts)
    tok_s = result.decode_tokens / result.decode_s
    floor_s = floor_bytes / (bandwidth * 1e12)
    return {
        "batch": batch,
        "decode_tokens_per_s": tok_s,
        "step_ms": 1000 * batch / tok_s,
        "floor_step_ms": 1000 * floor_s,
        "share_of_floor": floor_s / (batch / tok_s),
    }


def route_bf16_operands(x, router, topk):
    """moe.route with the logits' matmul on bf16 operands (exact products, float32 sums)."""
    logits = jnp.dot(x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_probs, experts = jax.lax.top_k(probs, topk)
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return moe_ops.Routing(logits=logits, weights=weights, experts=experts.astype(jnp.int32))


def profile_decode(
    generator: Generator, prompt: list[int] | None = None, calls: int = 3, batch: int = 1
) -> dict:
    """GPU kernels of decode steps of `batch` rows over the cache of `prompt` (default 16 tokens;
    a long one is prefilled in chunks), one compiled chunk of generator.chunk steps per call, per
    step: busy time, span, launches and the time of each kernel name."""
    prompt = list(range(3, 19)) if prompt is None else prompt
    width = prompt_width(len(prompt), generator.prefill_chunk)
    tokens, valid = left_pad([prompt] * batch, width)
    size = width + generator.chunk * (calls + 2)
    _, cache, next_pos, _ = generator.prefill(tokens, valid, cache_size=size)
    carry = {"cache": cache, "last": jnp.asarray(tokens[:, -1]), "pos": next_pos}
    done, key = jnp.zeros((batch,), bool), jax.random.key(0)

    def chunk():
        out = generator._decode(
            generator.state,
            carry["cache"],
            carry["last"],
            carry["pos"],
            done,
            key,
            -1,
            sampling=SamplingParams(),
            steps=generator.chunk,
        )
        carry["cache"], carry["last"], carry["pos"] = out[0], out[1], out[2]
        return out[4]

    summary = kernel_summary(trace_kernels(chunk, reps=calls), per=calls * generator.chunk)
    summary["layers"] = generator.cfg.num_layers
    summary["cache_tokens"] = len(prompt)
    summary["batch"] = batch
    return summary


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--moe-impl", default="dropless")
    p.add_argument("--unroll", type=int, default=kernel_plan.GPU_EXTEND_UNROLL)
    p.add_argument(
        "--router-dot",
        choices=("f32", "bf16"),
        default="f32",
        help="bf16: router logits from bf16 operands with float32 accumulation",
    )
    p.add_argument("--peer", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-batch", type=int, default=1, help="rows of the profiled steps")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="compute setting, e.g. decode_attention_impl=off (repeatable)",
    )
    args = p.parse_args()
    peer = (
        run_peer(
            [
                "bench/peer_decode.py",
                "--batches",
                args.batches,
                "--new",
                str(args.new),
                "--layers",
                str(args.layers),
            ],
            timeout=900,
        )
        if args.peer
        else None
    )
    kernel_plan.GPU_EXTEND_UNROLL = args.unroll
    if args.router_dot == "bf16":
        moe_block.route = route_bf16_operands
    cfg = mj.preset(
        "mixtral-8x7b",
        num_layers=args.layers,
        dtype="bfloat16",
        param_dtype="bfloat16",
        moe_impl=args.moe_impl,
        max_seq_len=4096,
        **dict(item.split("=", 1) for item in args.set),
    )
    bandwidth = copy_bandwidth_tbs()
    start = time.perf_counter()
    model = random_model(cfg)
    print(f"model built on device in {time.perf_counter() - start:.0f} s", flush=True)
    generator = Generator(model, chunk=16)
    plans = {
        b: kernel_plan.resolve(cfg, int(b), cached=True, queries=1) for b in args.batches.split(",")
    }
    for b, plan in plans.items():  # what extend() runs at each decode batch (the one decision)
        print(f"kernel plan, batch {b}: {plan}", flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [list(map(int, rng.integers(3, 32000, 16))) for _ in range(batch)]
        rows.append(decode_row(generator, prompts, args.new, step_bytes(cfg, batch), bandwidth))
        print(rows[-1], flush=True)
    prompt = [list(map(int, rng.integers(3, 32000, args.prefill)))]
    ttft = [
        generator.generate(prompt, max_new_tokens=16, eos_id=None).time_to_first_token_s
        for _ in range(3)
    ][-1]
    profile = profile_decode(generator, batch=args.profile_batch) if args.profile else None
    payload = {
        "env": environment(),
        "config": {
            "layers": args.layers,
            "moe_impl": args.moe_impl,
            "unroll": args.unroll,
            "router_dot": args.router_dot,
        },
        "copy_bandwidth_tbs": bandwidth,
        "kernel_plans": {b: str(p) for b, p in plans.items()},
        "decode": rows,
        f"ttft_{args.prefill}_tokens_s": ttft,
        "peer": peer,
        "profile": profile,
    }
    write_json(f"decode_{args.moe_impl}_unroll{args.unroll}_router_{args.router_dot}.json", payload)
    print(f"\ncopy bandwidth {bandwidth:.2f} TB/s; moe_impl={args.moe_impl}; layers={args.layers}")
    print(f"{'batch':>6} {'tok/s':>10} {'step ms':>9} {'floor ms':>9} {'of floor':>9}")
    for r in rows:
        print(
            f"{r['batch']:>6} {r['decode_tokens_per_s']:>10.1f} {r['step_ms']:>9.2f} "
            f"{r['floor_step_ms']:>9.2f} {r['share_of_floor']:>9.1%}"
        )
    print(f"time to first token, {args.prefill}-token prompt: {ttft * 1000:.0f} ms")
    if peer:
        print(f"peer (transformers generate): {peer}")
    if profile:
        print(
            f"\nbatch-{profile['batch']} decode step: busy {profile['busy_us']:.0f} us, span "
            f"{profile['span_us']:.0f} us, {profile['kernels']:.0f} kernel launches"
        )
        print_kernel_rows(profile, 30)
    jax.clear_caches()


if __name__ == "__main__":
    main()
