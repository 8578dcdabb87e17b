"""`prepare` throughput and memory, and the memory of a short training run from its shards, on
this machine (CPU), at two corpus sizes: the figures of BENCHMARKS.md's streaming-data section.

  PYTHONPATH=. python bench/prepare.py [--sizes-gb 0.25 1.0] [--dir /tmp/bench_prepare]
                                       [--workers 0] [--steps 20] [--keep] [--out FILE]

For each size: writes a synthetic JSONL corpus of that many bytes (documents of 500-4,000
characters cut from the Python documentation shipped with Python, seeded), then, each in a
fresh process under /usr/bin/time -v,
  1. `python -m mixtral_jax.data prepare CORPUS OUT --tokenizer mistral --quiet`: wall time,
     MB/s of input, the peak of the summed RSS of the command and its workers (sampled every
     0.1 s from /proc) and the largest single process's max RSS (time -v);
  2. the ceiling of 1: sentencepiece alone (`Tokenizer.encode_batch`, one thread, in this
     process) on the corpus's first 32 MB, in MB/s per core;
  3. `train.py --data.source=OUT` (tiny model with Mistral's 32,000-token vocabulary, batch 4 x
     128, --steps steps, a checkpoint at the end): max RSS, which must stay bounded (< 2 GB)
     and not grow with the corpus.
Prints one JSON line per size and writes them all to --out (default $OUT/prepare_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.paths import out_dir


def write_corpus(path: str, size: int, seed: int = 0) -> int:
    """A JSONL file of about `size` bytes; returns its documents."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    rng = random.Random(seed)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            lines = []
            for _ in range(1000):
                start = rng.randrange(len(text) - 4000)
                lines.append(json.dumps({"text": text[start : start + rng.randint(500, 4000)]}))
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block.encode())
            docs += len(lines)
    return docs


def tokenizer_ceiling(corpus: str, limit: int = 32 << 20) -> float:
    """MB/s of sentencepiece alone on one core over the first `limit` bytes of `corpus`."""
    from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path

    tok = Tokenizer.load(default_tokenizer_path())
    with open(corpus, "rb") as f:
        head = f.read(limit)
    texts = [json.loads(line)["text"] for line in head.splitlines()[:-1]]
    start = time.perf_counter()
    for i in range(0, len(texts), 256):
        tok.encode_batch(texts[i : i + 256], bos=True, eos=True)
    return len(head) / 1e6 / (time.perf_counter() - start)


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of process `root` and its descendants."""
    parents, rss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/statm") as f:
                rss[int(pid)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(rss.get(p, 0) for p in tree)


def measured(cmd: list[str]) -> dict:
    """Runs `cmd` under /usr/bin/time -v: wall_s, max_rss_bytes (largest process), and
    peak_tree_rss_bytes (the summed RSS of the process tree, sampled); exits on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:5])} failed: {err[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    return {"wall_s": wall, "max_rss_bytes": kb * 1024, "peak_tree_rss_bytes": peak, "stdout": out}


def bench_size(gb: float, args) -> dict:
    work = os.path.join(args.dir, f"{gb:g}gb")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    corpus, shards, run = (os.path.join(work, n) for n in ("corpus.jsonl", "shards", "run"))
    docs = write_corpus(corpus, int(gb * 1e9))
    size = os.path.getsize(corpus)
    prep = measured(
        [sys.executable, "-m", "mixtral_jax.data", "prepare", corpus, shards]
        + ["--tokenizer", "mistral", "--quiet", "--workers", str(args.workers)]
    )
    with open(os.path.join(shards, "index.json")) as f:
        index = json.load(f)
    ceiling = tokenizer_ceiling(corpus)
    train = measured(
        [sys.executable, "train.py", f"--data.source={shards}", "--model.vocab_size=32000"]
        + ["--train.batch_size=4", "--train.seq_len=128", f"--train.steps={args.steps}"]
        + [f"--train.eval_every={args.steps}", f"--checkpoint.save_every={args.steps}"]
        + [f"--checkpoint.dir={run}", "--train.log_every=5"]
    )
    result = {
        "corpus_bytes": size,
        "documents": docs,
        "tokens": index["tokens"],
        "shards": len(index["shards"]),
        "prepare_s": round(prep["wall_s"], 1),
        "prepare_mb_per_s": round(size / 1e6 / prep["wall_s"], 2),
        "tokenizer_alone_mb_per_s_one_core": round(ceiling, 2),
        "prepare_peak_rss_mb_all_processes": round(prep["peak_tree_rss_bytes"] / 2**20),
        "prepare_max_rss_mb_one_process": round(prep["max_rss_bytes"] / 2**20),
        "train_steps": args.steps,
        "train_s": round(train["wall_s"], 1),
        "train_max_rss_mb": round(train["max_rss_bytes"] / 2**20),
        "train_last_line": train["stdout"].strip().splitlines()[-2][:200],
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    import jax

    p = argparse.ArgumentParser()
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.25, 1.0])
    p.add_argument("--dir", default="/tmp/bench_prepare")
    p.add_argument("--workers", type=int, default=0, help="prepare workers (0: one per core)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep corpora, shards and runs")
    p.add_argument("--out", default=os.path.join(out_dir(), "prepare_cpu.json"))
    args = p.parse_args()
    results = []
    for gb in args.sizes_gb:
        r = {"corpus_gb": gb, "load_average_before": os.getloadavg(), **bench_size(gb, args)}
        print(json.dumps(r), flush=True)
        results.append(r)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "load_average_after": os.getloadavg(),  # the 2 cores are shared with other jobs
    }
    with open(args.out, "w") as f:
        json.dump({**meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
