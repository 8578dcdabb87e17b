"""`python -m mixtral_jax.surgery`: expert surgery on a checkpoint, and its evidence.

  drop   --checkpoint A --out B (--experts 3,5 | --per-layer "1,2;0,3" | --least-used N --report R)
  merge  --checkpoint A --out B --groups "0+1,2+3" [--weights-from-report R]
  topk   --checkpoint A --out B --k 1
  eval   --checkpoint A [--checkpoint B ...] [--text FILE] [--seq-len 128]
  swap   --checkpoint A --donor B --expert E [--layer L|all] [--donor-expert E2] --out C
  merge-lora --checkpoint BASE --adapters A --out C

`swap` copies one expert (w_gate, w_up, w_down) from a donor checkpoint of the same widths, or
from a dense Mistral/Llama Hugging Face directory's MLP (`surgery/swap.py`); `merge-lora` folds
LoRA adapters (a LoRA run's final model) into their base: W + A B * alpha / r, a plain model.
Over a quantized base (QLoRA) it first dequantizes it (codes * scales, in the checkpoint's
parameter dtype) and writes a float model: re-quantize it with `python -m mixtral_jax.quantize`.

Every command that writes makes a new model checkpoint of a valid smaller config (tokenizer
copied); `eval` prints held-out perplexity of each checkpoint on the same text, so trimming an
8x7B toward a 7B comes with evidence.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from mixtral_jax.fileio import read_json


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mixtral_jax.surgery",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    drop = sub.add_parser("drop", help="remove experts")
    merge = sub.add_parser("merge", help="average groups of experts")
    topk = sub.add_parser("topk", help="change experts per token")
    for q in (drop, merge, topk):
        q.add_argument("--checkpoint", required=True)
        q.add_argument("--out", required=True)
    which = drop.add_mutually_exclusive_group(required=True)
    which.add_argument("--experts", help="comma-separated experts dropped in every layer")
    which.add_argument("--per-layer", help="per-layer lists, ';' between layers: '1,2;0,3'")
    which.add_argument("--least-used", type=int, help="drop this many least-loaded per layer")
    drop.add_argument("--report", help="routing report.json (for --least-used)")
    merge.add_argument("--groups", required=True, help="'+' joins experts, ',' separates groups")
    merge.add_argument("--weights-from-report", help="weigh experts by their mean load share")
    topk.add_argument("--k", type=int, required=True)
    ev = sub.add_parser("eval", help="held-out perplexity of checkpoints on one text")
    ev.add_argument("--checkpoint", action="append", required=True)
    ev.add_argument(
        "--text",
        required=True,
        help="held-out text: a .txt/.jsonl file, a directory, or builtin:pydoc",
    )
    ev.add_argument("--tokenizer", help="sentencepiece model (default: the first checkpoint's)")
    ev.add_argument("--seq-len", type=int, default=128)
    ev.add_argument("--max-rows", type=int, default=64)
    swap = sub.add_parser("swap", help="copy one expert from a donor")
    swap.add_argument("--checkpoint", required=True)
    swap.add_argument("--donor", required=True, help="our checkpoint, or a dense HF directory")
    swap.add_argument("--expert", type=int, required=True, help="the expert replaced")
    swap.add_argument("--donor-expert", type=int, help="the donor's expert (default: --expert)")
    swap.add_argument("--layer", default="all", help="a layer index, or 'all' (default)")
    swap.add_argument("--out", required=True)
    merge_lora = sub.add_parser("merge-lora", help="fold LoRA adapters into their base")
    merge_lora.add_argument("--checkpoint", required=True, help="the base model checkpoint")
    merge_lora.add_argument("--adapters", required=True, help="an adapter directory")
    merge_lora.add_argument("--out", required=True)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return evaluate(args) if args.command == "eval" else operate(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def operate(args) -> int:
    from mixtral_jax import checkpoint
    from mixtral_jax.surgery import ops as surgery

    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} already exists: choose a new directory")
    cfg, params = checkpoint.load_model(args.checkpoint)
    if cfg.quantized and args.command == "merge-lora":  # QLoRA adapters: a float model
        params, cfg = _dequantized(params, cfg)
    if cfg.quantized:  # the ops rewrite float expert stacks, not codes and their scales
        raise ValueError(
            f"{args.checkpoint} is quantized (expert_bits={cfg.expert_bits}): operate on the "
            "float checkpoint, then quantize the result"
        )
    params = checkpoint.to_numpy(params)
    if args.command in ("swap", "merge-lora"):
        from mixtral_jax.surgery.swap_cli import swapped_or_merged

        params = swapped_or_merged(args, cfg, params)
    elif args.command == "drop":
        if args.least_used is not None:
            if not args.report:
                raise ValueError("--least-used needs --report (a routing report.json)")
            drop = surgery.least_used(_load_shares(args.report, cfg), args.least_used)
        elif args.per_layer:
            drop = [_ints(layer) for layer in args.per_layer.split(";")]
        else:
            drop = _ints(args.experts)
        params, cfg = surgery.drop_experts(params, cfg, drop)
    elif args.command == "merge":
        groups = [[int(e) for e in g.split("+")] for g in args.groups.split(",") if g]
        weights = None
        if args.weights_from_report:
            weights = _load_shares(args.weights_from_report, cfg).mean(axis=0)
        params, cfg = surgery.merge_experts(params, cfg, groups, weights)
    else:
        cfg = surgery.set_topk(cfg, args.k)
    tokenizer = os.path.join(args.checkpoint, checkpoint.TOKENIZER_FILE)
    checkpoint.save_model(args.out, params, cfg, tokenizer if os.path.isfile(tokenizer) else None)
    print(
        f"wrote {args.out}: {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, "
        f"{cfg.param_count:,} parameters ({cfg.active_param_count:,} active)"
    )
    return 0


def _dequantized(params: dict, cfg):
    """(params, config) of the float model a quantized checkpoint stands for: codes * scales in
    the checkpoint's parameter dtype (what its other weights are stored in)."""
    from mixtral_jax.model import quantized

    dtype = cfg.compute.param_dtype
    print(
        f"dequantizing the base (expert_bits={cfg.expert_bits}, attention_bits="
        f"{cfg.attention_bits}) to {dtype}: the merged model is a float model"
    )
    return quantized.dequantize_params(params, cfg, dtype), quantized.float_config(cfg)


def _load_shares(path: str, cfg) -> np.ndarray:
    report = read_json(path, "routing report")
    shares = np.array([layer["load_share"] for layer in report["layers"]])
    if shares.shape != (cfg.num_layers, cfg.num_experts):
        raise ValueError(
            f"report {path} is for {shares.shape[0]} layers x {shares.shape[1]} "
            f"experts, the checkpoint has {cfg.num_layers} x {cfg.num_experts}"
        )
    return shares


def evaluate(args) -> int:
    import jax
    import jax.numpy as jnp

    from mixtral_jax import checkpoint
    from mixtral_jax.model.params import from_params
    from mixtral_jax.tokenizer import Tokenizer
    from mixtral_jax.train import data, losses

    tokenizer_path = args.tokenizer or os.path.join(args.checkpoint[0], checkpoint.TOKENIZER_FILE)
    tokenizer = Tokenizer.load(tokenizer_path)
    docs = data.tokenize_documents(data.read_documents(args.text), tokenizer)
    rows = data.pack(docs, args.seq_len, seed=0)
    batch = data.make_batch(rows, np.arange(min(rows.num_rows, args.max_rows)))
    print(f"{'checkpoint':<40} {'experts':>7} {'top-k':>5} {'loss':>8} {'perplexity':>10}")
    for path in args.checkpoint:
        cfg, params = checkpoint.load_model(path)
        model = from_params(cfg, params)
        out = jax.jit(lambda t, p, s, m=model: m(t, positions=p, segment_ids=s).logits)(
            jnp.asarray(batch["tokens"]),
            jnp.asarray(batch["positions"]),
            jnp.asarray(batch["segment_ids"]),
        )
        nll, count = losses.cross_entropy(
            out, jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_mask"])
        )
        loss = float(nll / count)
        print(
            f"{path:<40} {cfg.num_experts:>7} {cfg.num_experts_per_tok:>5} {loss:>8.4f} "
            f"{float(np.exp(loss)):>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
