"""Generate text with a Mixtral-style model: KV cache, sampling, batching, streaming.

  python infer.py --checkpoint runs/tiny/model --prompt "The for statement"
  python infer.py --checkpoint DIR --prompt "a" --prompt "b" --temperature 0.8 --top-p 0.9
  echo "Hello" | python infer.py --checkpoint DIR --chat --json

DIR is one of our model checkpoints or a Hugging Face / Mistral Mixtral directory (safetensors):
either is read slice by slice straight to the device (memory-mapped, checksums verified for our
checkpoints), with a progress bar on a terminal (--quiet: none). The tokenizer is
DIR/tokenizer.model unless --tokenizer names one.

GPU memory: unless XLA_PYTHON_CLIENT_ALLOCATOR / XLA_PYTHON_CLIENT_PREALLOCATE are set, infer.py
uses CUDA's asynchronous allocator without preallocation, so the card holds what the model uses
(weights, KV cache, work space) instead of JAX's default 75% of its memory.

The compute dtype is the checkpoint's (bfloat16 weights compute in bfloat16) unless --dtype or
--model.dtype says otherwise. Compiled programs are kept in a persistent cache (default
~/.cache/mixtral_jax/jax_cache, or $XDG_CACHE_HOME/mixtral_jax/jax_cache), so a second start
does not recompile: --compile-cache DIR moves it, --no-compile-cache turns it off.

How the model computes takes train.py's dotted overrides of the compute settings, e.g.
  --model.dtype=bfloat16 --model.moe_impl=dense --model.decode_expert_impl=off
(`--dtype X` is short for `--model.dtype=X`); the architecture comes from DIR's config.json.
"""

import argparse
import json
import os
import sys
import time

START = time.monotonic()  # process start, near enough (before jax is imported)

from mixtral_jax.config import ConfigError


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        default="runs/tiny/model",
        help="model checkpoint or Hugging Face directory (default: the demo's)",
    )
    p.add_argument("--tokenizer", help="sentencepiece model file")
    p.add_argument(
        "--adapters",
        help="LoRA adapter directory on top of --checkpoint (merged; factors over quantized weights)",
    )
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    p.add_argument("--prompt-file", help="one prompt per line ('-' = standard input)")
    p.add_argument("--chat", action="store_true", help="wrap prompts as [INST] ... [/INST]")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--json", action="store_true", help="print ids, text and timing as JSON")
    p.add_argument("--show-routing", action="store_true", help="tokens per expert per layer")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the weights')"
    )
    p.add_argument("--quiet", action="store_true", help="no loading progress bar")
    p.add_argument(
        "--memory-stats",
        action="store_true",
        help="with --json: the device's peak bytes in use (jax memory_stats) and this process's "
        "host memory after loading and at the end, for benchmarks",
    )
    p.add_argument(
        "--compile-cache",
        default=default_compile_cache(),
        help="persistent compilation cache directory (default: %(default)s)",
    )
    p.add_argument(
        "--no-compile-cache", action="store_true", help="do not read or write compiled programs"
    )
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--model.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    return args


SEED_RANGE = (-(2**63), 2**63 - 1)  # what jax.random.key takes (a C long)


def default_compile_cache() -> str:
    """$XDG_CACHE_HOME/mixtral_jax/jax_cache (~/.cache when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mixtral_jax", "jax_cache")


def enable_compile_cache(directory: str) -> None:
    """JAX's persistent compilation cache at `directory`, every program cached (no minimum
    compile time or size, so the small ones count too)."""
    import jax

    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def check_args(args) -> None:
    """Argument errors found before anything is loaded or printed (one line each)."""
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise ConfigError(
            f"seed={args.seed} is outside the sampler's range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"
        )
    if any(s == "" for s in args.stop):
        raise ConfigError('--stop "" would stop before the first token: give a non-empty string')


def compute_changes(args) -> dict:
    """ComputeConfig changes from --model.<field>=value (and --dtype)."""
    from mixtral_jax.train.config import compute_overrides

    changes = compute_overrides(args.overrides)
    if args.dtype is not None:
        changes.setdefault("dtype", args.dtype)
    return changes


def read_text(path: str | None) -> str:
    """The UTF-8 text of `path` (None: standard input); a one-line error when it is not UTF-8."""
    what = "standard input" if path is None else path
    if path is None:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    else:
        with open(path, "rb") as stream:
            data = stream.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        text = read_text(None if args.prompt_file == "-" else args.prompt_file)
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts and not sys.stdin.isatty():
        text = read_text(None)
        if text.strip():
            prompts.append(text.strip())
    if not prompts:
        raise ConfigError("no prompt: pass --prompt, --prompt-file or text on standard input")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ConfigError(f"prompt {i + 1} is empty")
    return prompts


def main(argv=None) -> int:
    from mixtral_jax.generate.loading import use_inference_memory_defaults

    use_inference_memory_defaults()  # before JAX starts its GPU backend
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    from mixtral_jax.checkpoint.placement import show_progress
    from mixtral_jax.generate import Generator, SamplingParams
    from mixtral_jax.generate.loading import load_for_inference

    check_args(args)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    changes = compute_changes(args)
    prompts = read_prompts(args)
    if not args.no_compile_cache:
        enable_compile_cache(args.compile_cache)
    load_start = time.monotonic()
    model, tokenizer = load_for_inference(
        args.checkpoint,
        args.tokenizer,
        compute=changes,
        progress=show_progress(args.quiet),
        adapters=args.adapters,
    )
    load_s = time.monotonic() - load_start
    rss_after_load = host_memory() if args.memory_stats else None
    texts = [f"[INST] {p} [/INST]" if args.chat else p for p in prompts]
    ids = [tokenizer.encode(t) for t in texts]
    stream = not args.json and len(prompts) == 1  # one prompt: print tokens as they arrive
    so_far: list[int] = []
    printed = [0]

    def on_tokens(row, new):
        if stream:  # decode everything so far: pieces alone lose SentencePiece's spaces
            so_far.extend(new)
            text = cut_at_stop(tokenizer.decode(so_far), args.stop)
            sys.stdout.write(text[printed[0] :])
            sys.stdout.flush()
            printed[0] = len(text)

    def should_stop(row, new):
        return any(s in tokenizer.decode(new) for s in args.stop)

    generator = Generator(model)
    generator.validate(ids, args.max_new_tokens)  # argument errors before the prompt is echoed
    if stream:
        sys.stdout.write(prompts[0])
    generate_start = time.monotonic()
    result = generator.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        eos_id=tokenizer.eos_id,
        on_tokens=on_tokens,
        should_stop=should_stop if args.stop else None,
    )
    outputs = [cut_at_stop(tokenizer.decode(t), args.stop) for t in result.tokens]
    timing = {
        "time_to_first_token_s": result.time_to_first_token_s,
        "decode_tokens_per_s": result.decode_tokens / max(result.decode_s, 1e-9),
        "prompt_bucket": result.prompt_bucket,
        "load_s": load_s,
        "start_to_first_token_s": generate_start - START + result.time_to_first_token_s,
    }
    if args.memory_stats:
        timing["peak_bytes_in_use"] = peak_device_bytes()
        timing["host_after_load"] = rss_after_load
        timing["host_at_end"] = host_memory()
    if args.json:
        print(
            json.dumps(
                {
                    "completions": [
                        {"prompt": p, "prompt_ids": i, "ids": t, "text": o, "finish": f}
                        for p, i, t, o, f in zip(
                            prompts, ids, result.tokens, outputs, result.finish
                        )
                    ],
                    "timing": timing,
                    **(
                        {"tokens_per_expert": result.tokens_per_expert.tolist()}
                        if args.show_routing
                        else {}
                    ),
                }
            )
        )
        return 0
    if stream:
        print(flush=True)
    else:
        for prompt, output in zip(prompts, outputs):
            print(f"--- {prompt}\n{prompt}{output}", flush=True)
    print(
        f"[time to first token {timing['time_to_first_token_s'] * 1000:.0f} ms, "
        f"decode {timing['decode_tokens_per_s']:.1f} tokens/s]",
        file=sys.stderr,
    )
    if args.show_routing:
        for layer, row in enumerate(result.tokens_per_expert):
            print(
                f"layer {layer:3d} tokens per expert: {' '.join(f'{int(c):6d}' for c in row)}",
                file=sys.stderr,
            )
    return 0


def peak_device_bytes() -> int | None:
    """The first device's peak bytes in use (None where the backend keeps no statistics)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def host_memory() -> dict | None:
    """This process's resident and peak resident bytes (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError, ValueError):
        return None


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text up to the first stop string (excluded)."""
    cuts = [text.index(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


if __name__ == "__main__":
    sys.exit(main())
