"""Generate text with a Mixtral-style model: KV cache, sampling, batching, streaming.

  python infer.py --checkpoint runs/tiny/model --prompt "The for statement"
  python infer.py --checkpoint DIR --prompt "a" --prompt "b" --temperature 0.8 --top-p 0.9
  echo "Hello" | python infer.py --checkpoint DIR --chat --json

DIR is one of our model checkpoints or a Hugging Face Mixtral directory (safetensors, read and
converted in memory). The tokenizer is DIR/tokenizer.model unless --tokenizer names one.

How the model computes takes train.py's dotted overrides of the compute settings, e.g.
  --model.dtype=bfloat16 --model.moe_impl=dense --model.decode_expert_impl=off
(`--dtype X` is short for `--model.dtype=X`); the architecture comes from DIR's config.json.
"""

import argparse
import json
import sys

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
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--model.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    return args


def compute_changes(args) -> dict:
    """ComputeConfig changes from --model.<field>=value (and --dtype)."""
    from mixtral_jax.train.config import compute_overrides

    changes = compute_overrides(args.overrides)
    if args.dtype is not None:
        changes.setdefault("dtype", args.dtype)
    return changes


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if args.prompt_file == "-":
            lines = sys.stdin.readlines()
        else:
            with open(args.prompt_file, encoding="utf-8") as stream:
                lines = stream.readlines()
        prompts += [line.rstrip("\n") for line in lines if line.strip()]
    if not prompts and not sys.stdin.isatty():
        text = sys.stdin.read()
        if text.strip():
            prompts.append(text.strip())
    if not prompts:
        raise ConfigError("no prompt: pass --prompt, --prompt-file or text on standard input")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ConfigError(f"prompt {i + 1} is empty")
    return prompts


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    from mixtral_jax.generate import Generator, SamplingParams
    from mixtral_jax.generate.loading import load_for_inference

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    changes = compute_changes(args)
    prompts = read_prompts(args)
    model, tokenizer = load_for_inference(args.checkpoint, args.tokenizer, compute=changes)
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

    if stream:
        sys.stdout.write(prompts[0])
    result = Generator(model).generate(
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
    }
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


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text up to the first stop string (excluded)."""
    cuts = [text.index(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


if __name__ == "__main__":
    sys.exit(main())
