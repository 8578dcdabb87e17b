"""Does an XLA flag set make a benchmark faster? The same command under each XLA_FLAGS variant.

  python3 bench/xla_flags.py [--variants default,graphs,graphs1] -- python3 bench/engine.py ...

Runs the command once per variant in a fresh process (flags are read at start-up) with
XLA_FLAGS set to the variant's flags (added to any already set), and prints each run's JSON
lines (those starting with '{') with the variant's name, then writes $OUT/xla_flags.json.
Variants:
  default   XLA's own defaults (command buffers for fusions, cuBLAS, custom calls, cuDNN;
            graphs of at least 5 commands; while loops launched from the host each iteration)
  graphs    command buffers also for while loops and conditionals: the layer scan and the
            decode loop become CUDA graphs instead of one host launch per kernel
  graphs1   graphs, and graphs of any size (xla_gpu_graph_min_graph_size=1)
  nographs  no command buffers at all (every kernel launched by the host)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.paths import out_dir

_ALL = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"
VARIANTS = {
    "default": "",
    "graphs": f"--xla_gpu_enable_command_buffer={_ALL},WHILE,CONDITIONAL",
    "graphs1": f"--xla_gpu_enable_command_buffer={_ALL},WHILE,CONDITIONAL "
    "--xla_gpu_graph_min_graph_size=1",
    "nographs": "--xla_gpu_enable_command_buffer=",
}


def _record(line: str) -> dict | None:
    """A printed JSON object or Python dict literal (bench/decode.py prints the latter)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(line)
        except (ValueError, SyntaxError):
            return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="default,graphs,graphs1")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("give the command to run after --")
    runs = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), VARIANTS[name]) if f)
        try:
            out = subprocess.run(
                command,
                check=False,
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = [_record(line) for line in out.stdout.splitlines() if line.startswith("{")]
            lines = [line for line in lines if line is not None]
            status = out.returncode
            tail = out.stderr.strip().splitlines()[-1:] if status else []
        except subprocess.TimeoutExpired:
            lines, status, tail = [], "timeout", []
        runs.append({"variant": name, "flags": VARIANTS[name], "rc": status, "lines": lines})
        for line in lines:
            print(json.dumps({"variant": name, **line}), flush=True)
        if status:
            print(json.dumps({"variant": name, "rc": status, "stderr": tail}), flush=True)
    with open(os.path.join(out_dir(), "xla_flags.json"), "w") as f:
        json.dump(runs, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
