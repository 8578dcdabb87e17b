"""Command line of the converter: `to-orbax`, `to-hf`, `inspect`.

Errors (bad input of any kind) print one summary line and the list of problems to stderr and
exit 1; a bad command line exits 2 (argparse). No traceback for either.
"""

from __future__ import annotations

import argparse
import sys

from mixtral_jax.config import ConfigError

EPILOG = """\
layouts read (detected from tensor names):
  hf               model.layers.N.block_sparse_moe.experts.E.w1.weight (+ config.json)
  hf-fused         model.layers.N.mlp.experts.gate_up_proj / down_proj (transformers v5)
  mistral          consolidated*.safetensors + params.json (layers.N.feed_forward.experts.E.w1)
  mistral-stacked  Dec-2023 layers.N.block_sparse_moe.w1/w2/w3 + params.json
pickles (pytorch_model*.bin, *.pth) only with --allow-pickle (torch>=2.6, weights_only=True).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mixtral_jax.convert",
        epilog=EPILOG,
        description="Convert Mixtral checkpoints to and from ours.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-orbax", help="HF / Mistral directory -> our model checkpoint")
    a.add_argument("src", help="source directory")
    a.add_argument("dst", help="new model checkpoint directory (must not exist)")
    a.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept pickle weights, loaded with torch.load(weights_only=True)",
    )
    a.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="cast parameters (default: keep the stored dtype)",
    )
    a.add_argument("--check-finite", action="store_true", help="reject NaN / inf weights")
    a.add_argument("--tokenizer", help="sentencepiece model to store (default: SRC's)")
    a.add_argument(
        "--mesh",
        help="write every leaf in its sharding over this device mesh, "
        "each process its own shards (e.g. data=2,expert=4; see sharding.py)",
    )
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    b = sub.add_parser("to-hf", help="our model checkpoint -> HF directory (safetensors)")
    b.add_argument("src", help="model checkpoint directory")
    b.add_argument("dst", help="new HF directory (must not exist)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size (default 5)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("inspect", help="validate a directory and describe it; writes nothing")
    c.add_argument("src", help="HF / Mistral directory or model checkpoint")
    c.add_argument("--allow-pickle", action="store_true")
    return p


def _inspect(src: str, allow_pickle: bool) -> None:
    from mixtral_jax import checkpoint
    from mixtral_jax.convert.source import open_source

    if checkpoint.is_model_checkpoint(src):
        cfg, _ = checkpoint.LazyParams.open(src)  # checks the stored shapes, reads no data
        print(f"{src}: model checkpoint, {cfg.param_count:,} parameters, {cfg.compute.param_dtype}")
    else:
        source = open_source(src, allow_pickle=allow_pickle)
        cfg = source.cfg
        print(
            f"{src}: layout {source.layout}, {len(source.plan.expected)} tensors, "
            f"{source.total_bytes / 1e6:.1f} MB {cfg.compute.param_dtype}, "
            f"{cfg.param_count:,} parameters"
        )
    print(
        f"  L={cfg.num_layers} D={cfg.embed_dim} F={cfg.hidden_dim} N={cfg.num_heads} "
        f"K={cfg.num_kv_heads} H={cfg.head_dim} E={cfg.num_experts} "
        f"k={cfg.num_experts_per_tok} V={cfg.vocab_size}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mixtral_jax.convert import exporter, importer

    try:
        if args.command == "to-orbax":
            mesh = None
            if args.mesh:
                from mixtral_jax.parallel import sharding

                mesh = sharding.make_mesh(sharding.MeshConfig.parse(args.mesh))
            src = importer.to_orbax(
                args.src,
                args.dst,
                allow_pickle=args.allow_pickle,
                dtype=args.dtype,
                check_finite=args.check_finite,
                tokenizer=args.tokenizer,
                progress=not args.quiet,
                mesh=mesh,
            )
            print(
                f"wrote {args.dst} from {args.src} (layout {src.layout}, "
                f"{src.cfg.compute.param_dtype}, {src.total_bytes / 1e6:.1f} MB)"
            )
        elif args.command == "to-hf":
            if not args.max_shard_gb > 0:
                raise ConfigError(f"--max-shard-gb={args.max_shard_gb}: must be > 0")
            exporter.to_hf(
                args.src,
                args.dst,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
                progress=not args.quiet,
            )
            print(f"wrote {args.dst} from {args.src}")
        else:
            _inspect(args.src, args.allow_pickle)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
