"""Peak host memory of `infer.py` loading a ~2 GB checkpoint on this machine (CPU), against the
weight bytes, above a bare process (a benchmark, not a timed test).

  PYTHONPATH=. python bench/load_rss.py [--dir /tmp/load_rss] [--keep] [--out FILE]

Writes a random float32 Hugging Face directory (~2 GB: 8 layers of 8 experts, D=1024, F=2048,
vocab 32000) and converts it to our checkpoint; then, each in a fresh process under
/usr/bin/time -v, runs `infer.py --checkpoint DIR --prompt The --max-new-tokens 2 --quiet
--no-compile-cache` on both, and a bare process (python importing jax and the loader, one tiny
array), and the loader alone (`generate.loading.load_params`, no generation) on both. Reports
max RSS, (RSS - bare) / weight bytes (target < 1.3: the weights live in host
memory on CPU, so 1.0 is the floor) and wall time. JSON to --out (default $OUT/load_rss.json).
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
sys.path.insert(0, ROOT)

from bench.paths import out_dir

LOAD_ONLY = (
    "import sys, jax; from mixtral_jax.generate.loading import load_params; "
    "jax.block_until_ready(load_params(sys.argv[1], {})[1])"
)
BARE = (
    "import jax, jax.numpy as jnp, orbax.checkpoint, mixtral_jax.generate.loading; "
    "jnp.zeros(1).block_until_ready()"
)


def max_rss(cmd: list[str]) -> dict:
    """Runs `cmd` under /usr/bin/time -v: {"rss_bytes", "wall_s"}; exits on failure."""
    start = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/time", "-v", *cmd],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {out.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return {"rss_bytes": kb * 1024, "wall_s": wall}


def main() -> None:
    import mixtral_jax as mj
    from bench.random_hf import write_random_hf
    from mixtral_jax.convert import to_orbax

    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/load_rss")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=os.path.join(out_dir(), "load_rss.json"))
    args = p.parse_args()
    cfg = mj.ModelConfig.tiny(
        vocab_size=32000,
        embed_dim=1024,
        hidden_dim=2048,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        head_dim=128,
        num_experts=8,
        max_seq_len=256,
    )
    shutil.rmtree(args.dir, ignore_errors=True)
    hf, ours = os.path.join(args.dir, "hf"), os.path.join(args.dir, "ours")
    try:
        weights = write_random_hf(cfg, hf)
        to_orbax(hf, ours, progress=False)
        bare = max_rss([sys.executable, "-c", BARE])
        infer = [sys.executable, os.path.join(ROOT, "infer.py"), "--prompt", "The"]
        infer += ["--max-new-tokens", "2", "--quiet", "--no-compile-cache", "--checkpoint"]
        rows = {"hf": max_rss([*infer, hf]), "ours": max_rss([*infer, ours])}
        for name, where in (("hf", hf), ("ours", ours)):  # the loader alone, no generation
            rows[f"{name} load only"] = max_rss([sys.executable, "-c", LOAD_ONLY, where])
        for r in rows.values():
            r["over_weights"] = (r["rss_bytes"] - bare["rss_bytes"]) / weights
        payload = {
            "weight_bytes": weights,
            "bare_rss_bytes": bare["rss_bytes"],
            "rows": rows,
            "target_over_weights": 1.3,
            "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"weights {weights / 1e9:.2f} GB, bare process {bare['rss_bytes'] / 1e9:.2f} GB")
        print(f"{'run':>14} {'max RSS GB':>11} {'(RSS-bare)/weights':>19} {'wall s':>7}")
        for name, r in rows.items():
            print(
                f"{name:>14} {r['rss_bytes'] / 1e9:>11.2f} {r['over_weights']:>19.2f}"
                f" {r['wall_s']:>7.1f}"
            )
        print(f"JSON in {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
