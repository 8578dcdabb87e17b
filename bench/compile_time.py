"""Compile time of the whole train step, scanned against unrolled layers (`layer_loop`).

  PYTHONPATH=. python3 bench/compile_time.py [--layers 8,32] [--loops scan,unrolled] [--tiny]

Mixtral 8x7B widths (`--tiny`: the tiny preset, quick on the CPU), bf16 compute, float32
parameters, remat "full" (configs/mixtral_8x7b.toml's), batch 4 x 4096, one device: the step
is lowered and compiled on abstract inputs (`bench/update_passes.step_hlo`: nothing is
allocated, so a model larger than the device compiles). Prints and writes
$OUT/compile_time.json: seconds per (layers, loop), lowering and compilation together.
"""

from __future__ import annotations

import argparse
import time

import jax

import mixtral_jax as mj
from bench.common import environment, write_json
from bench.update_passes import step_hlo
from mixtral_jax.train.config import TrainConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="8,32")
    p.add_argument("--loops", default="scan,unrolled")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    batch, seq = (2, 64) if args.tiny else (4, 4096)
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    rows = []
    for layers in (int(x) for x in args.layers.split(",")):
        for loop in args.loops.split(","):
            cfg = mj.preset(
                "tiny" if args.tiny else "mixtral-8x7b",
                num_layers=layers,
                dtype="bfloat16",
                param_dtype="float32",
                remat="full",
                layer_loop=loop,
                max_seq_len=seq,
            )
            start = time.perf_counter()
            step_hlo(cfg, mj.param_shapes(cfg), tc, batch, seq)
            row = {"layers": layers, "loop": loop, "compile_s": time.perf_counter() - start}
            print(row, flush=True)
            rows.append(row)
            jax.clear_caches()
    write_json("compile_time.json", {"env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
