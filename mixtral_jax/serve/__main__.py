"""Serve a checkpoint over OpenAI's HTTP API, with continuous batching.

  python -m mixtral_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max-batch N]
  MIXTRAL_JAX_API_KEY=secret python -m mixtral_jax.serve --checkpoint DIR --host 0.0.0.0

Endpoints: POST /v1/completions, POST /v1/chat/completions (Mistral's instruct format; stream:
true as server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus).

DIR is one of our model checkpoints or a Hugging Face / Mistral directory, loaded as infer.py
loads it (straight to the device); the tokenizer is DIR/tokenizer.model unless --tokenizer names
one. How the model computes takes infer.py's dotted overrides (--model.dtype=bfloat16, ...).

Security: the server binds 127.0.0.1 unless --host says otherwise. With --api-key KEY (or the
environment variable MIXTRAL_JAX_API_KEY) every request but GET /health needs the header
`Authorization: Bearer KEY`. Bodies over --max-body-bytes are refused (413), prompts over
--max-prompt-tokens too (400).

SIGTERM or Ctrl-C: new requests get 503, running requests may finish for --drain-timeout seconds
and are then cancelled, and the process exits 0.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import signal
import sys

from mixtral_jax.config import ConfigError

API_KEY_ENV = "MIXTRAL_JAX_API_KEY"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mixtral_jax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="model checkpoint or HF directory")
    p.add_argument("--tokenizer", help="sentencepiece model file (default: DIR/tokenizer.model)")
    p.add_argument(
        "--adapters",
        help="LoRA adapter directory on top of --checkpoint (merged; factors over quantized weights)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--model-name", help="the name clients use (default: DIR's base name)")
    p.add_argument("--api-key", help=f"require this bearer token (or set ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429s")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--num-blocks", type=int, help="KV cache blocks (default: the engine's)")
    p.add_argument(
        "--prefill-chunk", type=int, default=128, help="prompt tokens per prefill row of a step"
    )
    p.add_argument(
        "--prefill-budget",
        type=int,
        help="prompt tokens per step at most, over as many prompts as it holds (default: 4 "
        "chunks, fewer where max-batch plus them would pass the grouped decode kernel's 512 "
        "tokens); bounds how much a prefill slows running streams",
    )
    p.add_argument(
        "--max-context", type=int, help="longest prompt + max_tokens (default: the model's)"
    )
    p.add_argument(
        "--decode-batches",
        help="decode batch sizes compiled, e.g. 16,64,256 (default: --max-batch and the powers "
        "of 4 below it); fewer compile sooner, a step runs the smallest that holds its rows",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger bodies: 413")
    p.add_argument(
        "--max-prompt-tokens", type=int, help="longer prompts: 400 (default: the context less one)"
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the weights')"
    )
    p.add_argument("--no-warmup", action="store_true", help="compile on the first requests")
    p.add_argument("--quiet", action="store_true", help="no loading progress bar")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--model.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = rest
    return args


def check_args(args) -> str | None:
    """One-line errors for bad flags, before anything is loaded; returns the API key."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} must be in [0, 65535]")
    names = ("max_batch", "max_queue", "block_size", "prefill_chunk")
    for name in (*names, "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("num_blocks", "max_context", "prefill_budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be >= 1")
    if args.prefill_budget is not None and args.prefill_budget < args.prefill_chunk:
        raise ConfigError(
            f"--prefill-budget {args.prefill_budget} must be >= --prefill-chunk "
            f"{args.prefill_chunk} (a step prefills at least one chunk)"
        )
    decode_batches(args)
    if not args.drain_timeout >= 0:
        raise ConfigError(f"--drain-timeout {args.drain_timeout} must be >= 0")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ConfigError(f"the API key (--api-key or ${API_KEY_ENV}) is empty")
    return key


def decode_batches(args) -> tuple[int, ...] | None:
    """--decode-batches as a tuple (None: the engine's default); ConfigError if malformed."""
    if args.decode_batches is None:
        return None
    try:
        batches = tuple(int(b) for b in args.decode_batches.split(","))
    except ValueError:
        batches = ()
    if not batches or not all(1 <= b <= args.max_batch for b in batches):
        raise ConfigError(
            f"--decode-batches {args.decode_batches} must be integers in [1, --max-batch "
            f"{args.max_batch}], comma-separated"
        )
    return batches


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build(args, api_key: str | None):
    """(app, engine) for the parsed arguments: loads the checkpoint, makes the engine."""
    from mixtral_jax.checkpoint.placement import show_progress
    from mixtral_jax.generate.loading import load_for_inference
    from mixtral_jax.train.config import compute_overrides

    changes = compute_overrides(args.overrides)
    if args.dtype is not None:
        changes.setdefault("dtype", args.dtype)
    model, tokenizer = load_for_inference(
        args.checkpoint,
        args.tokenizer,
        compute=changes,
        adapters=args.adapters,
        progress=show_progress(args.quiet),
    )
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    return app_for(model, tokenizer, name, args, api_key)


def app_for(model, tokenizer, name: str, args, api_key: str | None):
    """(app, engine) serving a model (warmed up unless --no-warmup; started by `serve`)."""
    from mixtral_jax.serve.app import create_app
    from mixtral_jax.serve.engine import Engine

    engine = Engine(
        model,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        prefill_chunk=args.prefill_chunk,
        prefill_budget=args.prefill_budget,
        max_context=args.max_context,
        batches=decode_batches(args),
        eos_id=tokenizer.eos_id,
    )
    if not args.no_warmup:
        engine.warmup()
    app = create_app(
        engine,
        tokenizer,
        model_name=name,
        context=engine.max_context,
        vocab_size=model.cfg.vocab_size,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        drain_timeout_s=args.drain_timeout,
    )
    return app, engine


def _uvicorn_server(config, on_exit):
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM / SIGINT: drain and stop (a second SIGINT forces). Unlike uvicorn's own,
            the signal is not raised again once the server stopped, so the exit status is 0."""
            on_exit()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return Server(config)


def serve(app, engine, args) -> None:
    """Runs the server until a signal; then drains, stops the engine and returns."""
    import uvicorn

    server = app.state.server
    # loop and http stay "auto": uvicorn then runs on uvloop and httptools, package
    # dependencies for the per-event cost at 256 streams (BENCHMARKS.md), else asyncio and h11.
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="on",
        timeout_graceful_shutdown=args.drain_timeout + 2,
    )
    uv = _uvicorn_server(config, lambda: setattr(server, "draining", True))
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    freeze_heap()
    engine.start()
    try:
        print(f"serving {server.limits.model_name} on http://{host}:{port}", flush=True)
        uv.run(sockets=[sock])
    finally:
        engine.shutdown(cancel=True, timeout=10.0)


def freeze_heap() -> None:
    """Collect once, then keep every object alive now (JAX, the model, the compiled steps) out
    of the cyclic collector's scans (`gc.freeze`), as vLLM does after start-up. Otherwise each
    full collection walks that whole heap while holding the GIL, stalling the engine's thread
    and the event loop alike: the largest part of the inter-token tail at 256 streams
    (bench/serve.py --fake-engine; BENCHMARKS.md, 2026-12-03). Objects made while serving are
    collected as before."""
    gc.collect()
    gc.freeze()


def main(argv=None) -> int:
    from mixtral_jax.generate.loading import use_inference_memory_defaults

    use_inference_memory_defaults()  # as infer.py: before JAX starts its GPU backend
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        api_key = check_args(args)
        if api_key is None and not _is_loopback(args.host):
            print(
                f"warning: serving on {args.host} without an API key (--api-key or "
                f"${API_KEY_ENV}): anyone who reaches it can use it",
                file=sys.stderr,
            )
        app, engine = build(args, api_key)
        serve(app, engine, args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
