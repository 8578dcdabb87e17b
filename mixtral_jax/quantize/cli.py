"""`python -m mixtral_jax.quantize`: weight-only quantization of a model checkpoint.

  python -m mixtral_jax.quantize --checkpoint A --out B --bits 8|4 [--group-size 128]
      [--attention] [--scale-dtype float32|bfloat16] [--eval]
  python -m mixtral_jax.quantize inspect DIR
  python -m mixtral_jax.quantize eval --original A --quantized B [--data builtin:pydoc]

The first writes B, a model checkpoint with int8 (per output channel unless --group-size) or
int4 (two per byte, in groups of --group-size rows of the contraction) experts, and with
--attention quantized attention projections too; `infer.py --checkpoint B` loads it like any
other. --eval then prints the held-out quality of A and B side by side (as `eval` does).
`inspect` prints each weight group's format and bytes against bfloat16. Bad input is one line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mixtral_jax.config import ConfigError

COMMANDS = ("inspect", "eval")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="builtin:pydoc", help="held-out source (train.py's forms)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="0: all of --data")
    p.add_argument("--seed", type=int, default=0, help="the training run's seed (its split)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batches", type=int, default=8)


def parse_args(argv):
    prog = "python -m mixtral_jax.quantize"
    if argv and argv[0] == "inspect":
        p = argparse.ArgumentParser(prog=f"{prog} inspect")
        p.add_argument("directory")
    elif argv and argv[0] == "eval":
        p = argparse.ArgumentParser(prog=f"{prog} eval")
        p.add_argument("--original", required=True)
        p.add_argument("--quantized", required=True)
        _eval_options(p)
    else:
        p = argparse.ArgumentParser(
            prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("--checkpoint", required=True, help="a float model checkpoint")
        p.add_argument("--out", required=True, help="the new checkpoint (must not exist)")
        p.add_argument("--bits", type=int, required=True, help="8 or 4")
        p.add_argument("--group-size", type=int, help="rows per scale (default: all of K)")
        p.add_argument("--attention", action="store_true", help="quantize q/k/v/o too")
        p.add_argument("--scale-dtype", default="float32", help="float32 or bfloat16")
        p.add_argument("--eval", action="store_true", help="then compare held-out quality")
        _eval_options(p)
    args = p.parse_args(argv[1:] if argv and argv[0] in COMMANDS else argv)
    args.command = argv[0] if argv and argv[0] in COMMANDS else "quantize"
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notices are not ours to show
    try:
        return run(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1


def run(args) -> int:
    from mixtral_jax.quantize import quality, stream

    if args.command == "inspect":
        print("\n".join(stream.inspect_lines(args.directory)))
        return 0
    if args.command == "quantize":
        stream.quantize_checkpoint(
            args.checkpoint,
            args.out,
            bits=args.bits,
            group_size=args.group_size,
            attention=args.attention,
            scale_dtype=args.scale_dtype,
        )
        print("\n".join(stream.inspect_lines(args.out)))
        if not args.eval:
            return 0
    original = args.original if args.command == "eval" else args.checkpoint
    quantized = args.quantized if args.command == "eval" else args.out
    split = {
        "eval_fraction": args.eval_fraction,
        "seed": args.seed,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "max_batches": args.max_batches,
    }
    result = quality.evaluate(original, quantized, args.data, **split)
    print("\n".join(result.lines(original, quantized)))
    return 0
