"""Issue 19's quality figure on a model trained on the GPU: train.py, then quantize --eval.

  python3 bench/quant_quality.py --tokenizer tokenizer.model.v1 [--work /tmp/quant_quality]
      [--steps 1200] [--formats int8,int4] [--set model.num_layers=8 ...]
  JAX_PLATFORMS=cpu python3 bench/quant_quality.py --tokenizer T --tiny    # the logic, in minutes

The corpus is the Python standard library's own sources (every .py file under the running
Python's stdlib, one document per file, written as .txt files under --work/corpus: 31.5 MB in
1,790 files for this machine's 3.11.7, 10.7 MB in 569 on the H200's 3.12): text shipped with
Python, larger than `builtin:pydoc`, so a model of hundreds of millions of parameters is not
trained on a few hundred kilobytes. Then, as a user runs them, each a subprocess:

  python3 train.py --data.source=CORPUS --data.tokenizer=TOKENIZER --model.* ... (bf16 compute)
  python3 -m mixtral_jax.quantize --checkpoint RUN/model --out RUN/FORMAT --bits B
      [--group-size 128] --eval --data CORPUS --seq-len S --max-batches N

the eval on train.py's own held-out split (5% of the documents, seed 0), in float32 at
`jax_default_matmul_precision=highest` (the GPU's float32 default is TF32). Each format's
printed comparison is parsed into the JSON ($OUT/quant_quality.json) beside train.py's last
line; the whole stdout of each command is kept there too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # bench.common from the repository

# 8 layers of D 1024, F 3584 (Mixtral's F/D), 8 experts top-2, 8 heads of 128 over 2 KV heads:
# ~0.8B parameters, ~0.25B active; the model train.py already ran on the H200.
MODEL = {
    "model.vocab_size": 32000,
    "model.embed_dim": 1024,
    "model.hidden_dim": 3584,
    "model.num_layers": 8,
    "model.num_heads": 8,
    "model.num_kv_heads": 2,
    "model.head_dim": 128,
    "model.num_experts": 8,
    "model.max_seq_len": 1024,
    "model.dtype": "bfloat16",
}
TINY = {  # the same path at CPU size
    "model.vocab_size": 32000,
    "model.embed_dim": 128,  # int4's group of 128 divides D and F
    "model.hidden_dim": 256,
    "model.num_layers": 2,
    "model.head_dim": 16,
    "model.max_seq_len": 128,
}
FORMATS = {"int8": ["--bits", "8"], "int4": ["--bits", "4", "--group-size", "128"]}
SUMMARY = re.compile(
    r"perplexity ([+-][0-9.]+)%, max logit error ([0-9.e+-]+), top-1 changed on ([0-9.]+)% of "
    r"([0-9,]+) held-out tokens"
)
LOSS_ROW = re.compile(r"^(\S+)\s+([0-9.]+)\s+([0-9.]+)$")


def write_corpus(out: str, limit_mb: float) -> dict:
    """Every stdlib .py file (sorted walk, no site-packages) as one .txt document, up to
    `limit_mb`; returns counts."""
    root = sysconfig.get_paths()["stdlib"]
    os.makedirs(out, exist_ok=True)
    docs, size = 0, 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for name in sorted(files):
            if not name.endswith(".py") or size > limit_mb * 1e6:
                continue
            with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            if not text.strip():
                continue
            with open(os.path.join(out, f"{docs:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(text)
            docs, size = docs + 1, size + len(text.encode())
    return {"stdlib": root, "documents": docs, "bytes": size}


def command(args: list[str], env: dict, timeout: float) -> dict:
    """Runs one product command; its stdout + stderr, return code and seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    print(f"$ {' '.join(args)}  ({seconds:.1f} s, rc {done.returncode})", flush=True)
    print("\n".join(output.strip().splitlines()[-8:]), flush=True)
    return {"args": args, "rc": done.returncode, "seconds": seconds, "output": output}


def parse_quality(output: str) -> dict | None:
    """The numbers of quantize --eval's comparison, or None if it printed none."""
    match = SUMMARY.search(output)
    if match is None:
        return None
    rows = [LOSS_ROW.match(line.strip()) for line in output.splitlines()]
    rows = [m for m in rows if m][:2]  # the original's row, then the quantized one's
    numbers = {f"{w}_{k}": None for w in ("original", "quantized") for k in ("loss", "perplexity")}
    if len(rows) == 2:
        for who, row in zip(("original", "quantized"), rows):
            numbers[f"{who}_loss"], numbers[f"{who}_perplexity"] = map(float, row.group(2, 3))
    return {
        **numbers,
        "perplexity_change_pct": float(match.group(1)),
        "max_logit_error": float(match.group(2)),
        "top1_changed_pct": float(match.group(3)),
        "tokens": int(match.group(4).replace(",", "")),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True, help="a sentencepiece file (Mistral's v1)")
    p.add_argument("--work", default="/tmp/quant_quality")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--corpus-mb", type=float, default=64.0)
    p.add_argument("--formats", default="int8,int4")
    p.add_argument("--tiny", action="store_true", help="CPU-sized model (the logic)")
    p.add_argument("--set", action="append", default=[], help="another train.py override")
    p.add_argument("--timeout", type=float, default=420.0, help="seconds for train.py")
    args = p.parse_args(argv)
    formats = args.formats.split(",")
    for name in formats:
        if name not in FORMATS:
            p.error(f"--formats: {name!r} is not one of {', '.join(FORMATS)}")
    tokenizer = os.path.abspath(args.tokenizer)
    if not os.path.isfile(tokenizer):
        p.error(f"--tokenizer: {tokenizer} does not exist")
    corpus, run = os.path.join(args.work, "corpus"), os.path.join(args.work, "run")
    info = write_corpus(corpus, args.corpus_mb)
    print(f"corpus: {info}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    model = TINY if args.tiny else MODEL
    overrides = [f"--{k}={v}" for k, v in model.items()] + [
        f"--data.source={corpus}",
        f"--data.tokenizer={tokenizer}",
        f"--checkpoint.dir={run}",
        f"--checkpoint.save_every={args.steps}",
        f"--train.steps={args.steps}",
        f"--train.batch_size={args.batch_size}",
        f"--train.seq_len={args.seq_len}",
        "--train.lr=1e-3",
        f"--train.warmup_steps={max(args.steps // 12, 1)}",
        f"--train.eval_every={args.steps}",
        f"--train.eval_batches={args.eval_batches}",
        *args.set,
    ]
    trained = command([sys.executable, "train.py", *overrides], env, args.timeout)
    payload = {"corpus": info, "train": trained, "formats": {}}
    if trained["rc"] == 0:
        exact = {**env, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
        for name in formats:
            out = os.path.join(args.work, name)
            ran = command(
                [
                    sys.executable,
                    "-m",
                    "mixtral_jax.quantize",
                    "--checkpoint",
                    os.path.join(run, "model"),
                    "--out",
                    out,
                    *FORMATS[name],
                    "--eval",
                    "--data",
                    corpus,
                    "--seq-len",
                    str(args.seq_len),
                    "--max-batches",
                    str(args.eval_batches),
                ],
                exact,
                timeout=300,
            )
            payload["formats"][name] = {**ran, "quality": parse_quality(ran["output"])}
    from bench.common import environment, write_json

    payload["env"] = environment()
    write_json("quant_quality.json", payload)
    summary = {k: v["quality"] for k, v in payload["formats"].items()}
    print(json.dumps({"train_rc": trained["rc"], "quality": summary}))
    return 0 if trained["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
