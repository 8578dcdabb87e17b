"""The product's real path at full 8x7B width on one GPU: a Hugging Face directory on disk,
loaded and served by `infer.py` run as a user runs it (a benchmark for the GPU machine).

  PYTHONPATH=. python bench/real_path.py --layers 16 [--dir /tmp/real_path] [--keep]
  PYTHONPATH=. python bench/real_path.py --tiny          # the same steps at tiny size, CPU

Writes a random bf16 HF directory at 8x7B widths with --layers of the 32 layers (sharded
safetensors + index + config.json + tokenizer, generated piece by piece with numpy: ~1.5 GB a
layer), then runs `infer.py --checkpoint DIR --json --memory-stats` twice in fresh processes:
cold (an empty compilation cache) and warm (the cache the first run filled). Each run is timed
under /usr/bin/time -v (host peak RSS; psutil polling where it is missing) while a thread polls
nvidia-smi (GPU memory used; JAX's preallocation is off in the child so that it shows what is
used). Reports, per run: load GB/s (weight bytes / infer.py's load time), peak GPU memory
(jax peak_bytes_in_use and nvidia-smi) / weight bytes, host peak RSS, start to first token,
time to first token and decode tokens/s. JSON in $OUT/real_path.json, and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


RATIOS = {  # measured bytes -> its ratio to the weight bytes
    "peak_bytes_in_use": "gpu_peak_over_weights",
    "gpu_peak_nvidia_smi_bytes": "gpu_peak_nvidia_smi_over_weights",
    "host_peak_rss_bytes": "host_peak_rss_over_weights",
}


class GpuPoller:
    """Max of nvidia-smi's memory.used (MiB, first GPU) sampled every `period` s while open."""

    def __init__(self, period: float = 0.1):
        self.period, self.peak_mib, self.available = period, 0, shutil.which("nvidia-smi")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int | None:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            check=False,
        )
        return int(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None

    def _run(self):
        while not self._stop.is_set():
            used = self._sample()
            if used is not None:
                self.peak_mib = max(self.peak_mib, used)
            time.sleep(self.period)

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()


def run_infer(cmd: list[str], env: dict) -> dict:
    """Runs `cmd` (infer.py ... --json); its JSON timing plus host peak RSS and GPU peak."""
    timer = shutil.which("time") and os.path.exists("/usr/bin/time")
    full = (["/usr/bin/time", "-v"] if timer else []) + cmd
    start = time.perf_counter()
    with GpuPoller() as gpu:
        proc = subprocess.Popen(
            full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        rss = _poll_rss(proc) if not timer else None
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"infer.py failed ({proc.returncode}): {err[-3000:]}")
    if timer:
        kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
        rss = int(kb.group(1)) * 1024 if kb else None
    timing = json.loads(out)["timing"]
    return {
        **timing,
        "wall_s": wall,
        "host_peak_rss_bytes": rss,
        "gpu_peak_nvidia_smi_bytes": gpu.peak_mib * 2**20 if gpu.available else None,
    }


# A process that starts JAX on the device and runs one op: the host memory any JAX program holds.
BARE = "import jax, jax.numpy as jnp; jnp.ones(8).block_until_ready(); print('{}')"


def run_bare(cmd: list[str], env: dict) -> dict:
    """Host peak RSS and GPU peak of a bare JAX process (the baseline of infer.py's figures)."""
    timer = os.path.exists("/usr/bin/time")
    with GpuPoller() as gpu:
        proc = subprocess.run(
            (["/usr/bin/time", "-v"] if timer else []) + cmd,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            check=False,
        )
    kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "host_peak_rss_bytes": int(kb.group(1)) * 1024 if kb else None,
        "gpu_nvidia_smi_bytes": gpu.peak_mib * 2**20 if gpu.available else None,
    }


def _poll_rss(proc) -> int | None:
    """Peak RSS of `proc` by psutil polling (where /usr/bin/time is missing)."""
    try:
        import psutil
    except ImportError:
        return None
    peak, p = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    return peak


def config(tiny: bool, layers: int):
    import mixtral_jax as mj

    if tiny:
        return mj.ModelConfig.tiny(
            vocab_size=512, num_layers=layers, param_dtype="bfloat16", max_seq_len=256
        )
    return mj.ModelConfig.mixtral_8x7b(num_layers=layers, param_dtype="bfloat16")


def main() -> None:
    from bench.random_hf import write_random_hf

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="tiny widths on CPU: checks the steps")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "real_path"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--allocators",
        default="",
        help="comma list of XLA_PYTHON_CLIENT_ALLOCATOR values for extra warm runs "
        "(e.g. cuda_async,platform)",
    )
    args = p.parse_args()
    layers = 2 if args.tiny and args.layers == 16 else args.layers
    cfg = config(args.tiny, layers)
    shutil.rmtree(args.dir, ignore_errors=True)
    model_dir, cache = os.path.join(args.dir, "hf"), os.path.join(args.dir, "jax_cache")
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    if args.tiny:
        env["JAX_PLATFORMS"] = "cpu"
    try:
        start = time.perf_counter()
        weights = write_random_hf(cfg, model_dir)
        write_s = time.perf_counter() - start
        print(f"wrote {weights / 1e9:.2f} GB ({layers} layers) in {write_s:.0f} s", flush=True)
        cmd = [sys.executable, os.path.join(ROOT, "infer.py"), "--checkpoint", model_dir]
        cmd += ["--prompt", "The quick brown fox", "--json", "--memory-stats", "--quiet"]
        cmd += ["--max-new-tokens", str(args.max_new_tokens), "--compile-cache", cache]
        rows = {"cold": run_infer(cmd, env), "warm": run_infer(cmd, env)}
        for allocator in filter(None, args.allocators.split(",")):
            rows[f"warm_{allocator}"] = run_infer(
                cmd, dict(env, XLA_PYTHON_CLIENT_ALLOCATOR=allocator)
            )
        bare = [sys.executable, "-c", BARE]
        rows_bare = run_bare(bare, env)
        for r in rows.values():
            r["load_GB_per_s"] = weights / 1e9 / r["load_s"]
            for key, ratio in RATIOS.items():
                r[ratio] = r[key] / weights if r.get(key) else None
        payload = {
            "tiny": args.tiny,
            "layers": layers,
            "weight_bytes": weights,
            "write_s": write_s,
            "max_new_tokens": args.max_new_tokens,
            "rows": rows,
            "bare_process": rows_bare,
            "date": time.strftime("%Y-%m-%d"),
        }
        from bench.common import write_json

        write_json("real_path_tiny.json" if args.tiny else "real_path.json", payload)
        _table(payload)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _table(payload: dict) -> None:
    print(f"weights {payload['weight_bytes'] / 1e9:.2f} GB, {payload['layers']} layers")
    head = ["run", "load GB/s", "GPU peak/w", "smi peak/w", "RSS GB", "start->1st s", "TTFT s"]
    print(" ".join(f"{h:>12}" for h in head + ["decode tok/s"]))
    for name, r in payload["rows"].items():
        rss = r["host_peak_rss_bytes"]
        cells = [
            name,
            _fmt(r["load_GB_per_s"], ".2f"),
            _fmt(r["gpu_peak_over_weights"], ".3f"),
            _fmt(r["gpu_peak_nvidia_smi_over_weights"], ".3f"),
            _fmt(rss and rss / 1e9, ".2f"),
            _fmt(r["start_to_first_token_s"], ".2f"),
            _fmt(r["time_to_first_token_s"], ".3f"),
            _fmt(r["decode_tokens_per_s"], ".1f"),
        ]
        print(" ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
