"""Conversion throughput and peak memory on a synthetic multi-GB checkpoint (a benchmark, not a
test; CPU only, no download).

  python bench/convert.py [--layers 2] [--dir /tmp/convert_bench] [--keep]
                         [--out bench/results/convert_cpu.json]

Builds a Hugging Face Mixtral directory at 8x7B widths and reduced depth (bf16, sharded
safetensors + index + config.json, written tensor by tensor), then times, each in a fresh
process under /usr/bin/time:
  to-orbax  HF directory -> our model checkpoint
  to-hf     our model checkpoint -> HF directory
Reports wall time, GB/s (checkpoint bytes / wall time) and peak resident memory, beside the
checkpoint size, its largest stacked leaf (L x E x D x F) and the largest slice the converter
holds (one expert's D x F matrix; the embedding / lm_head at these widths). Prints a table,
writes JSON to --out and deletes the multi-GB files unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python bench/convert.py`: bench.random_hf from the repository

from mixtral_jax import config as config_lib


def write_synthetic(cfg, directory: str) -> int:
    """A random bf16 HF checkpoint for cfg, one tensor in memory at a time; returns its bytes."""
    from bench.random_hf import write_random_hf

    return write_random_hf(cfg.replace(param_dtype="bfloat16"), directory)


def timed_command(args: list[str]) -> dict:
    """Runs `python -m mixtral_jax.convert ARGS` under /usr/bin/time -v: wall s, peak RSS."""
    start = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "mixtral_jax.convert", *args, "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"conversion failed: {out.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return {"wall_s": wall, "peak_rss_gib": rss_kb / 1024**2}


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("jax", "orbax-checkpoint", "tensorstore", "numpy")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dir", default="/tmp/convert_bench")
    p.add_argument("--keep", action="store_true")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "convert_cpu.json")
    )
    args = p.parse_args()
    cfg = config_lib.preset(
        "mixtral-8x7b", num_layers=args.layers, param_dtype="bfloat16", dtype="bfloat16"
    )
    shutil.rmtree(args.dir, ignore_errors=True)
    hf, ours, back = (os.path.join(args.dir, n) for n in ("hf", "ours", "hf_back"))
    try:
        start = time.perf_counter()
        size = write_synthetic(cfg, hf)
        print(
            f"synthetic checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        largest = args.layers * cfg.num_experts * cfg.embed_dim * cfg.hidden_dim * 2
        slice_bytes = max(cfg.embed_dim * cfg.hidden_dim, cfg.vocab_size * cfg.embed_dim) * 2
        rows = {
            "to-orbax": timed_command(["to-orbax", hf, ours]),
            "to-hf": timed_command(["to-hf", ours, back]),
        }
        for r in rows.values():
            r["GB_per_s"] = size / 1e9 / r["wall_s"]
            r["peak_rss_over_checkpoint"] = r["peak_rss_gib"] * 1024**3 / size
        payload = {
            "layers": args.layers,
            "checkpoint_gb": size / 1e9,
            "largest_leaf_gb": largest / 1e9,
            "largest_slice_gb": slice_bytes / 1e9,
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "versions": _versions(),
            "date": time.strftime("%Y-%m-%d"),
            "rows": rows,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(
            f"checkpoint {size / 1e9:.2f} GB, largest stacked leaf {largest / 1e9:.2f} GB, "
            f"largest slice {slice_bytes / 1e9:.2f} GB; JSON in {args.out}"
        )
        print(f"{'direction':>9} {'wall s':>7} {'GB/s':>6} {'peak RSS GiB':>13} {'RSS/size':>9}")
        for name, r in rows.items():
            print(
                f"{name:>9} {r['wall_s']:>7.1f} {r['GB_per_s']:>6.2f} {r['peak_rss_gib']:>13.2f}"
                f" {r['peak_rss_over_checkpoint']:>9.0%}"
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
