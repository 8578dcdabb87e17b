"""Prints the optimized HLO of the costliest XLA kernels of a profiled decode step.

  XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_module_re=.*decode_fn.*" \
      python bench/decode.py --profile --batches 1
  python bench/hlo_fusions.py DUMP $OUT/decode_dropless_unroll4.json [--top 25]
  XLA_FLAGS="--xla_dump_to=DUMP --xla_dump_hlo_module_re=.*train.*" \
      python bench/train_step.py --impls dropless --no-peer --profile
  python bench/hlo_fusions.py DUMP $OUT/train_step.json --module train --runs 0

The profile JSON is a file with a top-level "profile" (decode.py) or a list "runs" whose
entry --runs N has one (train_step.py).

For each kernel name in the profile (Pallas kernels and matmuls skipped), the instruction that
launches it and the first lines of the computation it runs: what each small kernel does.
"""

from __future__ import annotations

import argparse
import glob
import json
import re


def hlo_names(name: str) -> set[str]:
    """The instruction names a profiled kernel may have in HLO text: the profiler writes
    loop_add_fusion_3 where the text has loop_add_fusion.3."""
    return {name, re.sub(r"_(\d+)$", r".\1", name)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dump")
    p.add_argument("profile_json")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--module", default="decode_fn", help="part of the dumped module's name")
    p.add_argument("--runs", type=int, default=None, help="the profile of runs[N]")
    p.add_argument("--lines", type=int, default=13, help="lines of each fused computation")
    args = p.parse_args()
    with open(args.profile_json) as f:
        data = json.load(f)
    profile = (data["runs"][args.runs] if args.runs is not None else data)["profile"]["by_name"]
    texts = []
    for path in glob.glob(f"{args.dump}/*{args.module}*after_optimizations.txt"):
        with open(path) as f:
            texts.append(f.read())

    # The module of the profiled step: the one that defines most of the profile's kernel names.
    def names_in(t: str) -> int:
        return sum(any(f"%{n} = " in t for n in hlo_names(name)) for name in profile)

    text = max(texts, key=names_in)
    shown = 0
    for name, v in profile.items():
        if shown >= args.top:
            break
        if name.startswith(("expert_", "decode_projection", "memcpy", "gmm", "tgmm")):
            continue
        shown += 1
        print(f"\n== {name}: {v['us']:.1f} us per step, {v['count']:.1f} launches")
        pattern = "|".join(re.escape(n) for n in hlo_names(name))
        match = re.search(rf"^\s*(ROOT )?%(?:{pattern}) = .*$", text, re.MULTILINE)
        if not match:
            print("   (not found)")
            continue
        print("   " + match.group(0).strip()[:400])
        called = re.search(r"calls=%([\w.\-]+)", match.group(0))
        if called:
            body = re.search(
                rf"^%{re.escape(called.group(1))} .*?^}}", text, re.MULTILINE | re.DOTALL
            )
            if body:
                for line in body.group(0).splitlines()[1 : 1 + args.lines]:
                    print("      " + line.strip()[:220])


if __name__ == "__main__":
    main()
