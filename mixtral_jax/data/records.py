"""Text records of a corpus: which files, cut into work units, and the texts of each unit.

Sources are files, directories (walked recursively, in sorted order) or glob patterns of `.txt`
(one document per file), `.jsonl` and `.jsonl.gz` (one document per line, in a JSON text field)
and `.parquet` (one document per row of a text column). A work unit is what one worker
tokenizes into one shard: a byte range of a JSONL file (cut at line starts), a whole `.jsonl.gz`
file, a row group of a Parquet file, or a run of consecutive `.txt` files. Units are derived
from the file list and sizes alone, so a rerun plans the same units.

A bad record (a line that is not UTF-8 or not JSON, a missing or non-string text field, a null
Parquet value, a text file that is not UTF-8) is a ConfigError naming file and line, or, with
`skip_bad`, counted and skipped.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator

from mixtral_jax.config import ConfigError

EXTENSIONS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
UNIT_BYTES = 32 << 20  # input bytes per work unit (and shard)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One shard's worth of input: `kind` txt (paths), jsonl (path, byte range [start, end)),
    gz (path), parquet (path, row group `start`); `size` is its input bytes (progress)."""

    kind: str
    paths: tuple[str, ...]
    start: int = 0
    end: int = 0
    size: int = 0

    def key(self) -> dict:
        """What identifies the unit's input: paths, range and the files' sizes and mtimes."""
        stats = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in self.paths]
        return {"kind": self.kind, "files": stats, "start": self.start, "end": self.end}


@dataclasses.dataclass
class Skipped:
    """Bad records skipped (`skip_bad`): how many, and the first one's description."""

    count: int = 0
    first: str = ""

    def add(self, where: str) -> None:
        self.count += 1
        self.first = self.first or where


def source_files(sources: list[str]) -> list[str]:
    """The corpus files of `sources` (files, directories, globs), each once, in source order
    and sorted within a directory or glob."""
    out: list[str] = []
    for source in sources:
        if os.path.isdir(source):
            found = sorted(
                os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs if _known(f)
            )
            if not found:
                raise ConfigError(f"directory {source} holds no {', '.join(EXTENSIONS)} file")
        elif os.path.isfile(source):
            if not _known(source):
                raise ConfigError(f"{source}: not a {', '.join(EXTENSIONS)} file")
            found = [source]
        else:
            found = sorted(p for p in glob.glob(source, recursive=True) if _known(p))
            if not found:
                raise ConfigError(f"source {source} does not exist or matches no corpus file")
        out.extend(p for p in found if p not in out)
    return out


def _known(path: str) -> bool:
    return path.endswith(EXTENSIONS)


def plan_units(files: list[str], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    """Work units over `files`, in order."""
    units: list[Unit] = []
    texts: list[str] = []
    for path in files + [""]:
        if texts and (not path.endswith(".txt") or sum(map(os.path.getsize, texts)) >= unit_bytes):
            units.append(Unit("txt", tuple(texts), size=sum(map(os.path.getsize, texts))))
            texts = []
        if path.endswith(".txt"):
            texts.append(path)
        elif path.endswith(".jsonl"):
            size = os.path.getsize(path)
            for start in range(0, max(size, 1), unit_bytes):
                end = min(start + unit_bytes, size)
                units.append(Unit("jsonl", (path,), start, end, end - start))
        elif path.endswith(".jsonl.gz"):
            units.append(Unit("gz", (path,), size=os.path.getsize(path)))
        elif path.endswith(".parquet"):
            groups = _parquet(path).num_row_groups
            size = os.path.getsize(path)
            units.extend(
                Unit("parquet", (path,), g, g, size // max(groups, 1)) for g in range(groups)
            )
    return units


def read_text(path: str) -> str:
    """The UTF-8 text of `path`; ConfigError naming line and byte for a file that is not UTF-8
    text (invalid bytes, or a NUL byte: a binary file)."""
    with open(path, "rb") as f:
        raw = f.read()
    nul = raw.find(b"\0")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start if nul < 0 else min(e.start, nul)
    else:
        if nul < 0:
            return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
        bad = nul
    line = raw.count(b"\n", 0, bad) + 1
    raise ConfigError(
        f"data source {path} is not UTF-8 text: byte {raw[bad]:#04x} at line {line}, offset "
        f"{bad} (a binary file? text sources are .txt / .jsonl, token ids .npy)"
    )


def unit_texts(unit: Unit, field: str, skipped: Skipped | None) -> Iterator[str]:
    """The document texts of `unit`, in order (blank JSONL lines are no records). A bad record
    raises ConfigError naming file and line, unless `skipped` (skip_bad) counts it."""
    if unit.kind == "txt":
        for path in unit.paths:
            try:
                yield read_text(path)
            except ConfigError as e:
                _bad(skipped, str(e))
    elif unit.kind == "jsonl":
        yield from _jsonl_range(unit.paths[0], unit.start, unit.end, field, skipped)
    elif unit.kind == "gz":
        yield from _jsonl_gz(unit.paths[0], field, skipped)
    else:
        yield from _parquet_group(unit.paths[0], unit.start, field, skipped)


def _bad(skipped: Skipped | None, where: str) -> None:
    if skipped is None:
        raise ConfigError(where + " (--skip-bad skips bad records)")
    skipped.add(where)


class _BadRecord(Exception):
    """A record that is not a JSON object with a string text field (what is wrong)."""


def _record(line: bytes, field: str) -> str | None:
    """The text of one JSONL line (None for a blank line); _BadRecord saying what is wrong."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRecord(f"not UTF-8: byte {line[e.start]:#04x} at column {e.start + 1}") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise _BadRecord(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict) or field not in record:
        raise _BadRecord(f"no {field!r} field")
    if not isinstance(record[field], str):
        raise _BadRecord(f"{field!r} is a {type(record[field]).__name__}, not a string")
    return record[field]


def _jsonl_range(path: str, start: int, end: int, field: str, skipped) -> Iterator[str]:
    """Records of the lines of `path` that start in bytes [start, end)."""
    with open(path, "rb") as f:
        f.seek(max(start - 1, 0))
        if start > 0:
            f.readline()  # the rest of a line that began before `start` (none if at a start)
        first = pos = f.tell()
        local = 0
        while pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            local += 1
            try:
                text = _record(line, field)
            except _BadRecord as e:
                line_no = _lines_before(path, first) + local
                _bad(skipped, f"{path}:{line_no}: {e}")
                continue
            if text is not None:
                yield text


def _lines_before(path: str, offset: int) -> int:
    """Newlines in the first `offset` bytes of `path` (for error messages only)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(offset, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count


def _jsonl_gz(path: str, field: str, skipped) -> Iterator[str]:
    line_no = 0
    try:
        with gzip.open(path, "rb") as f:
            for line in f:
                line_no += 1
                try:
                    text = _record(line, field)
                except _BadRecord as e:
                    _bad(skipped, f"{path}:{line_no}: {e}")
                    continue
                if text is not None:
                    yield text
    except (OSError, EOFError, zlib.error) as e:
        _bad(skipped, f"{path}: not a readable gzip file after line {line_no} ({e})")


def _parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs `pip install pyarrow`") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ConfigError(f"{path}: not a readable Parquet file ({e})") from None


def _parquet_group(path: str, group: int, field: str, skipped) -> Iterator[str]:
    pf = _parquet(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ConfigError(f"{path}: no column {field!r} (columns: {', '.join(names)})")
    first = sum(pf.metadata.row_group(g).num_rows for g in range(group))
    column = pf.read_row_group(group, columns=[field]).column(0)
    for i, text in enumerate(column.to_pylist()):
        if not isinstance(text, str):
            what = "null" if text is None else f"a {type(text).__name__}"
            _bad(skipped, f"{path}:row {first + i + 1}: {field!r} is {what}, not a string")
        elif text.strip():
            yield text
