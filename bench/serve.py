"""The OpenAI-compatible server under load, measured by a client over HTTP.

  python3 bench/serve.py [--layers 32] [--concurrency 1,16,64,256] [--prompt 128] [--output 512]
      [--requests-per-client 2] [--max-batch 256] [--prefill-chunk 128] [--prefill-budget 512]
      [--decode-batches 64,256]
      [--tokenizer FILE] [--checkpoint DIR]
  JAX_PLATFORMS=cpu python3 bench/serve.py --tiny       # the code path on CPU, in seconds
  python3 bench/serve.py --fake-engine [--fake-step-ms 0]  # the HTTP layer alone (a harness)

Two processes. The server: `python -m mixtral_jax.serve --checkpoint DIR` with --checkpoint,
else this script's server role, which makes the full Mixtral 8x7B widths (bf16, `--layers`) with
random weights on the device (the checkpoint does not fit the GPU machine's disk;
bench/common.random_model) and serves it through the same code (`serve.__main__.app_for`,
`serve`). The tokenizer is --tokenizer, else mistral-common's tokenizer.model.v1 where it is
installed (only text comes from it: the prompts are random token ids).

With --fake-engine the server streams tokens from `bench/fake_engine.py` (no model: one token
per running request every --fake-step-ms) through the same app: the HTTP layer's and the
client's own ceiling, which the model's figures can approach but not pass.

The client (no JAX; --client-procs processes, default 1 per 32 concurrent requests up to 8, so
that parsing the chunks of 256 streams does not bound the rate it measures): per concurrency
level C, C workers each send
`--requests-per-client` streamed /v1/completions requests one after another (closed loop, so new
requests are prefilled while others decode) of `--prompt` random token ids and `--output` new
tokens (ignore_eos, greedy), and time every chunk's tokens (return_token_ids). Reported per level:
aggregate output tokens/s (all tokens / wall time of the level), time to first token p50/p99,
inter-token latency p50/p99 (a chunk of n tokens after a gap g counts n gaps of g/n), their
ratio, errors, and the engine's compiles during the level (`traces` in /metrics: 0 in steady
state). At the end the server gets SIGTERM and its exit status is recorded. Prints one JSON line
and writes $OUT/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python3 bench/serve.py`: bench.* and mixtral_jax from the repository

import httpx
import numpy as np

from bench.paths import out_dir

MODEL = "bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=["client", "server"], default="client")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tiny", action="store_true", help="the tiny model with a trained tokenizer")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=512)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=128)
    p.add_argument("--prefill-budget", type=int, default=None, help="default: the server's")
    p.add_argument(
        "--decode-batches",
        default=None,
        help="the server's compiled decode batches (default: its own)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--tokenizer", help="sentencepiece file of 32,000 tokens (Mixtral 8x7B's)")
    p.add_argument("--checkpoint", help="serve this checkpoint through the CLI instead")
    p.add_argument("--startup-timeout", type=float, default=1500.0)
    p.add_argument("--fake-engine", action="store_true", help="no model: the HTTP layer alone")
    p.add_argument("--fake-step-ms", type=float, default=0.0, help="the fake engine's step")
    p.add_argument("--client-procs", type=int, default=None, help="default: C // 32, 1 to 8")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        help="compute setting of the built model, e.g. paged_attention_impl=pallas (repeatable)",
    )
    return p.parse_args(argv)


# ---- the server ------------------------------------------------------------------------------
def server_main(args) -> None:
    """Builds the model on the device and serves it on a free loopback port (until SIGTERM)."""
    import mixtral_jax as mj
    from bench.common import environment, random_model
    from mixtral_jax.serve import __main__ as cli

    tokenizer = _tokenizer(args)
    if args.fake_engine:
        return _serve_fake(args, tokenizer, cli, environment)
    if args.tiny:
        cfg = mj.ModelConfig.tiny(vocab_size=tokenizer.vocab_size)
    else:
        cfg = mj.preset(
            "mixtral-8x7b",
            num_layers=args.layers,
            dtype="bfloat16",
            param_dtype="bfloat16",
            **dict(item.split("=", 1) for item in args.set),
        )
    start = time.perf_counter()
    model = random_model(cfg)
    built_s = time.perf_counter() - start
    serve_args = cli.parse_args(_serve_flags(args, "unused"))
    start = time.perf_counter()
    app, engine = cli.app_for(model, tokenizer, MODEL, serve_args, None)
    warmup_s = time.perf_counter() - start
    info = {"env": environment(), "model_built_s": built_s, "warmup_s": warmup_s}
    info["engine"] = {  # the shapes warmup compiled
        "batches": engine.batches,
        "widths": engine.widths,
        "prefill_chunk": engine.prefill_chunk,
        "prefill_budget": engine.prefill_budget,
        "chunk_rows": engine.chunk_rows,
    }
    print(json.dumps(info), flush=True)
    cli.serve(app, engine, serve_args)


def _serve_fake(args, tokenizer, cli, environment) -> None:
    from bench.fake_engine import FakeEngine
    from mixtral_jax.serve.app import create_app

    context = args.prompt + args.output
    engine = FakeEngine(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=context,
        vocab=tokenizer.vocab_size,
        step_s=args.fake_step_ms / 1e3,
    )
    app = create_app(engine, tokenizer, model_name=MODEL, context=context)
    print(json.dumps({"env": environment(), "fake_engine": True}), flush=True)
    cli.serve(app, engine, cli.parse_args(_serve_flags(args, "unused")))


def _tokenizer(args):
    from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path, train_tokenizer

    if args.tokenizer:
        return Tokenizer.load(args.tokenizer)
    if args.tiny:
        import tempfile

        text = ["The quick brown fox jumps over the lazy dog.", "Experts route tokens."] * 30
        return train_tokenizer(text, os.path.join(tempfile.mkdtemp(), "tok.model"), 96)
    try:
        return Tokenizer.load(default_tokenizer_path(32000))
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"pass --tokenizer FILE (mistral-common's tokenizer.model.v1): {e}")


def _serve_flags(args, checkpoint: str) -> list[str]:
    """The serving CLI's flags for these settings (a free loopback port)."""
    return [
        "--checkpoint",
        checkpoint,
        "--model-name",
        MODEL,
        "--port",
        "0",
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(args.max_queue),
        "--block-size",
        str(args.block_size),
        "--prefill-chunk",
        str(args.prefill_chunk),
        "--max-context",
        str(args.prompt + args.output),
        "--log-level",
        "warning",
        "--quiet",
    ] + [
        flag
        for name in ("prefill_budget", "decode_batches")
        if getattr(args, name) is not None
        for flag in (f"--{name.replace('_', '-')}", str(getattr(args, name)))
    ]


def start_server(args):
    """(process, base url, its start-up info) once the server answers /health."""
    if args.checkpoint:
        command = [sys.executable, "-m", "mixtral_jax.serve", *_serve_flags(args, args.checkpoint)]
        if args.tokenizer:
            command += ["--tokenizer", args.tokenizer]
    else:
        command = [sys.executable, os.path.abspath(__file__), "--role", "server"]
        command += sys.argv[1:]
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)  # carried wheels
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95", **os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    info, deadline = {}, time.monotonic() + args.startup_timeout
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the server exited with {proc.wait()} before it served")
        if line.startswith("{"):
            info = json.loads(line)
        if line.startswith("serving"):
            url = line.split(" on ")[1].strip()
            break
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url, info
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not answer /health in time")


# ---- the client ------------------------------------------------------------------------------
async def one_request(client, url: str, prompt: list[int], args) -> dict:
    """One streamed completion: its start, (time, tokens) per chunk with tokens, and errors."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": args.output,
        "temperature": args.temperature,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    start, stamps, error = time.perf_counter(), [], None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"start": start, "stamps": [], "error": f"{r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    n = len(choice.get("token_ids") or [])
                    if n:
                        stamps.append((time.perf_counter(), n))
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    tokens = sum(n for _, n in stamps)
    if error is None and tokens != args.output:
        error = f"{tokens} tokens of {args.output}"
    return {"start": start, "stamps": stamps, "error": error}


def run_level(url: str, concurrency: int, requests: int, args, rng) -> tuple[list, float]:
    """`requests` requests from `concurrency` closed-loop workers, spread over client
    processes -> (results, wall seconds from the first request to the last chunk)."""
    prompts = [[int(t) for t in rng.integers(3, args.vocab, args.prompt)] for _ in range(requests)]
    procs = args.client_procs or max(1, min(8, concurrency // 32))
    procs = min(procs, concurrency)
    if procs == 1:
        return asyncio.run(_level(url, concurrency, prompts, args))
    shares = [
        (url, concurrency // procs + (n < concurrency % procs), prompts[n::procs], args)
        for n in range(procs)
    ]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_level_in_process, shares)
    results = [r for part, _ in parts for r in part]
    starts = [r["start"] for r in results]
    ends = [r["stamps"][-1][0] for r in results if r["stamps"]] or starts
    return results, max(ends) - min(starts)


def _level_in_process(share) -> tuple[list, float]:
    return asyncio.run(_level(*share))


async def _level(url: str, concurrency: int, prompts: list, args) -> tuple[list, float]:
    """Closed-loop workers over `prompts` in this process -> (results, wall seconds)."""
    prompts = list(prompts)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
    results = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:

        async def worker():
            while prompts:
                results.append(await one_request(client, url, prompts.pop(), args))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def summarize(results: list, wall_s: float, concurrency: int) -> dict:
    """A level's figures (seconds) from its requests' chunk timings."""
    ttft = [r["stamps"][0][0] - r["start"] for r in results if r["stamps"]]
    gaps = []
    for r in results:
        for (t0, _), (t1, n) in zip(r["stamps"], r["stamps"][1:]):
            gaps += [(t1 - t0) / n] * n
    tokens = sum(n for r in results for _, n in r["stamps"])

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    itl50, itl99 = pct(gaps, 50), pct(gaps, 99)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": [r["error"] for r in results if r["error"]][:5],
        "error_count": sum(bool(r["error"]) for r in results),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": itl50,
        "itl_p99_s": itl99,
        "itl_p99_over_p50": itl99 / itl50 if itl50 else None,
    }


def engine_gauges(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    prefix = "mixtral_jax_engine_"
    return {
        line.split()[0][len(prefix) :]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def client_main(args) -> dict:
    proc, url, info = start_server(args)
    args.vocab = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["vocab_size"]
    rng = np.random.default_rng(0)
    levels = []
    try:
        warm = min(args.max_batch, 8)  # the HTTP path and every engine shape once, not counted
        short = argparse.Namespace(**{**vars(args), "output": min(args.output, 16)})
        run_level(url, warm, warm, short, rng)
        for c in [int(c) for c in args.concurrency.split(",")]:
            before = engine_gauges(url)
            results, wall = run_level(url, c, c * args.requests_per_client, args, rng)
            row = summarize(results, wall, c)
            row["compiles"] = engine_gauges(url).get("traces", 0) - before.get("traces", 0)
            levels.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = "killed after 120 s"
    return {
        **info,
        "config": {
            k: getattr(args, k)
            for k in ("layers", "tiny", "prompt", "output", "requests_per_client", "max_batch")
            + ("prefill_chunk", "prefill_budget", "decode_batches", "block_size", "temperature")
            + ("checkpoint",)
            + ("fake_engine", "fake_step_ms", "client_procs", "set")
        },
        "levels": levels,
        "server_exit": exit_code,
    }


def main():
    args = parse_args()
    if args.role == "server":
        server_main(args)
        return
    payload = client_main(args)
    with open(os.path.join(out_dir(), "serve.json"), "w") as f:
        json.dump(payload, f, indent=1)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
