"""`python -m mixtral_jax.routing`: the routing report of a checkpoint on a text.

  python -m mixtral_jax.routing --checkpoint runs/tiny/model --text notes.txt --out report/

Writes report.json, load_heatmap.png, coactivation.png and tokens.html into --out.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mixtral_jax.routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text file to analyse ('-' for standard input)")
    source.add_argument("--prompt", help="text given inline")
    p.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's)")
    p.add_argument("--out", default="routing_report", help="output directory")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per analysed row")
    p.add_argument("--max-tokens", type=int, default=8192, help="analyse at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--dead-below",
        type=float,
        default=0.25,
        help="flag experts whose load share is under this / E",
    )
    p.add_argument(
        "--overloaded-above",
        type=float,
        default=2.0,
        help="flag experts whose load share is over this / E",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from mixtral_jax import checkpoint
    from mixtral_jax.model.params import from_params
    from mixtral_jax.routing.analyse import chunk_tokens, collect_trace, write_report
    from mixtral_jax.tokenizer import Tokenizer

    for name in ("seq_len", "max_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.text is not None:
        if args.text == "-":
            text = sys.stdin.read()
        else:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
    else:
        text = args.prompt
    if not text.strip():
        raise ValueError("the text to analyse is empty")
    tokenizer_path = args.tokenizer or os.path.join(args.checkpoint, checkpoint.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        raise ValueError(f"no tokenizer at {tokenizer_path}: pass --tokenizer")
    cfg, params = checkpoint.load_model(args.checkpoint)
    if args.seq_len > cfg.max_seq_len:
        raise ValueError(
            f"--seq-len={args.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}"
        )
    tokenizer = Tokenizer.load(tokenizer_path)
    ids = tokenizer.encode(text)[: args.max_tokens]
    tokens, mask = chunk_tokens(ids, args.seq_len, pad_id=0)
    model = from_params(cfg, params)
    trace = collect_trace(model, tokens, mask, args.batch_size)
    pieces = [
        [tokenizer.piece(t) if m else "" for t, m in zip(row, row_mask)]
        for row, row_mask in zip(tokens, mask)
    ]
    report = write_report(
        args.out,
        trace,
        pieces,
        title=f"Routing of {args.checkpoint}",
        dead_below=args.dead_below,
        overloaded_above=args.overloaded_above,
    )
    print(
        f"analysed {report['num_tokens']} tokens over {report['num_layers']} layers; "
        f"wrote {args.out}/report.json, load_heatmap.png, coactivation.png, tokens.html"
    )
    for layer in report["layers"]:
        flags = []
        if layer["dead_experts"]:
            flags.append(f"dead {layer['dead_experts']}")
        if layer["overloaded_experts"]:
            flags.append(f"overloaded {layer['overloaded_experts']}")
        if flags:
            print(f"  layer {layer['layer']}: " + ", ".join(flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
