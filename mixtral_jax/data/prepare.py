"""`python -m mixtral_jax.data prepare SOURCE... OUT --tokenizer mistral|PATH`: corpus -> shards.

Plans work units over the sources (`records.plan_units`), tokenizes them in parallel worker
processes (BOS + ids + EOS per document, as the in-memory path encodes), each into one shard
(`shards.ShardWriter`), with a progress bar in input bytes, then writes the index. Resumable: a
shard whose done marker matches its unit's input (paths, byte range, sizes, mtimes), the
tokenizer and the text field is kept, so rerunning the command after an interruption tokenizes
only what was not finished. Bad records stop the run with one line naming file and line, or are
counted and skipped with `--skip-bad`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib

import numpy as np
from tqdm import tqdm

from mixtral_jax.config import ConfigError
from mixtral_jax.data import records, shards
from mixtral_jax.fileio import atomic_write_text
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path

ENCODE_BATCH = 256  # texts per sentencepiece call


def _crc_file(path: str) -> str:
    with open(path, "rb") as f:
        return f"{zlib.crc32(f.read()):08x}"


class _Job:
    """What every unit shares: output directory, tokenizer, text field, skip_bad."""

    def __init__(self, out: str, tokenizer_path: str, field: str, skip_bad: bool):
        self.out, self.tokenizer_path, self.field, self.skip_bad = (
            out,
            tokenizer_path,
            field,
            skip_bad,
        )
        self.tokenizer_crc = _crc_file(tokenizer_path)
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict:  # sent to spawned workers without the loaded model
        return {**self.__dict__, "_tokenizer": None}

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self.tokenizer_path)
        return self._tokenizer

    def marker_for(self, unit: records.Unit) -> dict:
        return {"unit": unit.key(), "tokenizer": self.tokenizer_crc, "field": self.field}

    def is_done(self, k: int, unit: records.Unit) -> bool:
        marker = shards.read_marker(self.out, k)
        want = json.loads(json.dumps(self.marker_for(unit)))  # tuples as JSON lists
        return marker is not None and all(marker.get(key) == v for key, v in want.items())

    def run(self, k: int, unit: records.Unit) -> dict:
        """Tokenizes unit k into shard k; returns its marker."""
        tok = self.tokenizer
        skipped = records.Skipped() if self.skip_bad else None
        writer = shards.ShardWriter(self.out, k, tok.vocab_size)
        texts: list[str] = []
        for text in records.unit_texts(unit, self.field, skipped):
            if text.strip():  # as the in-memory path: a blank document has no tokens
                texts.append(text)
            if len(texts) >= ENCODE_BATCH:
                self._encode(writer, texts)
                texts = []
        self._encode(writer, texts)
        marker = self.marker_for(unit)
        marker["skipped"] = skipped.count if skipped else 0
        marker["first_bad"] = skipped.first if skipped else ""
        return writer.close(marker)

    def _encode(self, writer: shards.ShardWriter, texts: list[str]) -> None:
        if not texts:
            return
        tok = self.tokenizer
        for ids in tok.encode_batch(texts, bos=True, eos=True):
            writer.add(np.asarray(ids, np.int32))


_WORKER: dict = {}


def _init_worker(job: _Job) -> None:
    _WORKER["job"] = job


def _work(item: tuple[int, records.Unit]) -> tuple[int, dict | str]:
    """A worker's unit: (k, marker), or (k, the error's one line) for a ConfigError."""
    k, unit = item
    try:
        return k, _WORKER["job"].run(k, unit)
    except ConfigError as e:
        return k, str(e)


def prepare(
    sources: list[str],
    out: str,
    tokenizer: str,
    *,
    workers: int = 0,
    field: str = "text",
    skip_bad: bool = False,
    unit_bytes: int = records.UNIT_BYTES,
    progress: bool = True,
) -> dict:
    """Tokenizes `sources` into shards under `out`; returns the index (also written there).

    Args:
      tokenizer: "mistral" (Mistral's v1 tokenizer from mistral-common) or a sentencepiece file.
      workers: worker processes (0: one per CPU core; 1: in this process).
    """
    path = default_tokenizer_path(32000) if tokenizer == "mistral" else tokenizer
    Tokenizer.load(path)  # a bad tokenizer file is one line, before anything is written
    units = records.plan_units(records.source_files(sources), unit_bytes)
    if not units:
        raise ConfigError(f"sources {' '.join(sources)} hold no data")
    _claim(out)
    shutil.copyfile(path, os.path.join(out, shards.TOKENIZER))
    job = _Job(out, os.path.join(out, shards.TOKENIZER), field, skip_bad)
    _remove_stale(out, len(units))
    todo = [k for k, u in enumerate(units) if not job.is_done(k, u)]
    markers = {k: shards.read_marker(out, k) for k in range(len(units)) if k not in todo}
    bar = tqdm(
        total=sum(u.size for u in units),
        initial=sum(units[k].size for k in markers),
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not progress,
        file=sys.stderr,
    )
    begin = time.perf_counter()
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    try:
        for k, result in _results(job, [(k, units[k]) for k in todo], workers):
            if isinstance(result, str):
                raise ConfigError(result)
            markers[k] = result
            bar.update(units[k].size)
    finally:
        bar.close()
    seconds = time.perf_counter() - begin
    index = _write_index(out, job, units, markers)
    done_bytes = sum(units[k].size for k in todo)
    index["seconds"], index["mb_per_s"] = seconds, done_bytes / 1e6 / max(seconds, 1e-9)
    return index


def _results(job: _Job, items: list, workers: int):
    """(k, marker or error line) of every item, from `workers` processes (or this one)."""
    if workers <= 1:
        _init_worker(job)
        for item in items:
            yield _work(item)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may run JAX
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield from pool.imap_unordered(_work, items)


def _claim(out: str) -> None:
    """Makes `out`, or checks that an existing one is a (partly) prepared directory."""
    prepared = os.path.isfile(os.path.join(out, shards.TOKENIZER))
    if os.path.isdir(out) and os.listdir(out) and not prepared:
        raise ConfigError(f"{out} exists and is not a prepared shard directory")
    os.makedirs(os.path.join(out, shards.SHARDS), exist_ok=True)


def _remove_stale(out: str, count: int) -> None:
    """Removes shards numbered `count` and beyond (a plan that shrank) and the old index."""
    if os.path.isfile(os.path.join(out, shards.INDEX)):
        os.remove(os.path.join(out, shards.INDEX))
    for name in os.listdir(os.path.join(out, shards.SHARDS)):
        if name.split(".")[0].isdigit() and int(name.split(".")[0]) >= count:
            os.remove(os.path.join(out, shards.SHARDS, name))


def _write_index(out: str, job: _Job, units, markers: dict[int, dict]) -> dict:
    tok = job.tokenizer
    counts = np.zeros(tok.vocab_size, np.int64)
    for k in range(len(units)):
        counts += np.load(shards.shard_path(out, k, "counts.npy"))
    np.save(os.path.join(out, shards.UNIGRAM), counts)
    listed = [
        {"shard": k, "docs": markers[k]["docs"], "tokens": markers[k]["tokens"]}
        for k in range(len(units))
    ]
    index = {
        "format": shards.FORMAT,
        "tokenizer": {
            "file": shards.TOKENIZER,
            "vocab_size": tok.vocab_size,
            "crc32": job.tokenizer_crc,
        },
        "dtype": shards.token_dtype(tok.vocab_size).name,
        "field": job.field,
        "docs": sum(s["docs"] for s in listed),
        "tokens": sum(s["tokens"] for s in listed),
        "max_id": max(m["max_id"] for m in markers.values()),
        "input_bytes": sum(u.size for u in units),
        "skipped": sum(m["skipped"] for m in markers.values()),
        "first_bad": next((m["first_bad"] for m in markers.values() if m["first_bad"]), ""),
        "shards": listed,
    }
    atomic_write_text(os.path.join(out, shards.INDEX), json.dumps(index, indent=1))
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixtral_jax.data")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("prepare", help="tokenize a corpus into token shards for data.source")
    c.add_argument(
        "paths",
        nargs="+",
        metavar="SOURCE... OUT",
        help="files, directories or globs of .txt / .jsonl / .jsonl.gz / .parquet, then the output directory",
    )
    c.add_argument("--tokenizer", required=True, help="'mistral' or a sentencepiece .model file")
    c.add_argument(
        "--seq-len", type=int, help="report how many rows of seq_len+1 tokens the data fills"
    )
    c.add_argument(
        "--workers", type=int, default=0, help="worker processes (default: one per core)"
    )
    c.add_argument("--text-field", default="text", help="JSON field / Parquet column of the text")
    c.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    c.add_argument(
        "--unit-mb", type=float, default=records.UNIT_BYTES / (1 << 20), help="input MiB per shard"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if len(args.paths) < 2:
            raise ConfigError(
                "prepare needs SOURCE... OUT: at least one source and the output directory"
            )
        if args.seq_len is not None and args.seq_len < 1:
            raise ConfigError(f"--seq-len={args.seq_len}: must be >= 1")
        index = prepare(
            args.paths[:-1],
            args.paths[-1],
            args.tokenizer,
            workers=args.workers,
            field=args.text_field,
            skip_bad=args.skip_bad,
            unit_bytes=max(1, int(args.unit_mb * (1 << 20))),
            progress=not args.quiet,
        )
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the command to go on", file=sys.stderr)
        return 130
    out = args.paths[-1]
    line = (
        f"prepared {out}: {index['docs']:,} documents, {index['tokens']:,} tokens in "
        f"{len(index['shards'])} shards ({index['mb_per_s']:.1f} MB/s)"
    )
    if args.seq_len:
        line += f"; at least {-(-index['tokens'] // (args.seq_len + 1)):,} rows of {args.seq_len + 1} tokens"
    if index["skipped"]:
        line += f"; skipped {index['skipped']:,} bad records (first: {index['first_bad']})"
    print(line)
    return 0
