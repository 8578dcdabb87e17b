"""Training data: documents -> token pieces -> packed rows -> shuffled batches with a resumable state.

- Sources: `builtin:pydoc` (the Python documentation topics shipped with the standard library,
  so the default run needs no download), text files (one document per file), JSONL (one document
  per line, its `text` field) and pre-tokenized `.npy` streams (documents end with EOS).
- Every document is encoded as BOS ... EOS, cut into pieces of at most T+1 tokens, and the pieces
  are packed greedily into rows of T+1 tokens. Segment ids keep documents apart: attention never
  crosses a boundary and no loss is taken on a prediction across one; positions restart at every
  piece. Id 0 marks padding.
- A held-out share of the documents (chosen by the seed) is kept for eval loss and perplexity.
- `BatchIterator` walks the rows in a seeded order per epoch; its state is two integers, saved
  in every checkpoint, so a resumed run sees exactly the batches it would have seen. In a
  multi-process run each process loads only its devices' rows of every batch (`select`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

from mixtral_jax.config import ConfigError

BUILTIN_PYDOC = "builtin:pydoc"


def read_documents(source: str) -> list[str] | list[np.ndarray]:
    """The documents of `source` (texts, or token arrays for `.npy`)."""
    if source == BUILTIN_PYDOC:
        import pydoc_data.topics

        return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    if not os.path.exists(source):
        raise ConfigError(f"data source {source} does not exist")
    if os.path.isdir(source):
        files = sorted(
            os.path.join(source, f)
            for f in os.listdir(source)
            if f.endswith((".txt", ".jsonl", ".npy"))
        )
        if not files:
            raise ConfigError(f"data directory {source} holds no .txt, .jsonl or .npy file")
        return [doc for f in files for doc in read_documents(f)]
    if source.endswith(".npy"):
        return [_read_token_array(source)]
    text = read_text(source)
    if not source.endswith(".jsonl"):
        return [text]
    docs = []
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            doc = None
        if not isinstance(doc, str):
            raise ConfigError(f"{source}:{line_no} is not a JSON object with a 'text' field")
        docs.append(doc)
    return docs


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


def _read_token_array(path: str) -> np.ndarray:
    """A `.npy` token stream as int32; ConfigError for a file that is no 1-D integer array or
    holds ids outside int32."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"data source {path} is not a readable .npy array: {e}") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(
            f"data source {path} holds a {ids.dtype} array of shape {ids.shape}: token ids are "
            "a 1-D integer array"
        )
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ConfigError(f"data source {path} holds token id {bad}, outside [0, 2**31)")
    return ids.astype(np.int32)


def check_token_ids(documents: list[np.ndarray], vocab_size: int, source: str) -> None:
    """ConfigError naming the first token id (of tokenized `documents`) outside
    [0, vocab_size): out-of-vocabulary ids would make every step non-finite."""
    for doc in documents:
        bad = np.flatnonzero((doc < 0) | (doc >= vocab_size))
        if bad.size:
            raise ConfigError(
                f"data source {source} holds token id {int(doc[bad[0]])}, outside the "
                f"model's vocabulary of {vocab_size} (model.vocab_size)"
            )


def tokenize_documents(docs, tokenizer) -> list[np.ndarray]:
    """BOS + tokens + EOS per text document; `.npy` streams are split after each EOS."""
    out = []
    for doc in docs:
        if isinstance(doc, np.ndarray):
            ends = np.flatnonzero(doc == tokenizer.eos_id) + 1
            out.extend(p for p in np.split(doc, ends) if p.size)
        elif doc.strip():
            out.append(np.array(tokenizer.encode(doc, bos=True, eos=True), np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of T+1 tokens. tokens, segments, positions: [R, T+1] int32 (segment 0 = padding)."""

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]


def pack(documents: list[np.ndarray], seq_len: int, seed: int) -> PackedRows:
    """Cuts documents into pieces of <= seq_len+1 tokens and packs them first-fit into rows."""
    width = seq_len + 1
    pieces = [doc[i : i + width] for doc in documents for i in range(0, len(doc), width)]
    pieces = [p for p in pieces if len(p) >= 2]  # a 1-token piece predicts nothing
    if not pieces:
        raise ConfigError("the data holds no document of 2 or more tokens")
    order = np.random.default_rng(seed).permutation(len(pieces))
    rows: list[list[np.ndarray]] = []
    room: list[int] = []
    open_rows: list[int] = []  # rows that can still take a piece; the oldest are closed first
    for i in order:
        piece = pieces[i]
        fit = next((r for r in open_rows if room[r] >= len(piece)), None)
        if fit is None:
            rows.append([])
            room.append(width)
            open_rows.append(fit := len(rows) - 1)
            if len(open_rows) > 64:  # bounds the first-fit search on large data
                open_rows.pop(0)
        rows[fit].append(piece)
        room[fit] -= len(piece)
        if room[fit] < 2:
            open_rows.remove(fit)
    tokens = np.zeros((len(rows), width), np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for r, row in enumerate(rows):
        at = 0
        for s, piece in enumerate(row, 1):
            tokens[r, at : at + len(piece)] = piece
            segments[r, at : at + len(piece)] = s
            positions[r, at : at + len(piece)] = np.arange(len(piece))
            at += len(piece)
    return PackedRows(tokens, segments, positions)


def split_documents(documents: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) documents; at least one of each when there are two or more."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    n = len(documents)
    n_eval = 0 if eval_fraction == 0 or n < 2 else max(1, round(n * eval_fraction))
    order = np.random.default_rng(seed + 1).permutation(n)
    held = set(order[:n_eval].tolist())
    return (
        [d for i, d in enumerate(documents) if i not in held],
        [d for i, d in enumerate(documents) if i in held],
    )


def make_batch(rows: PackedRows, index: np.ndarray) -> dict[str, np.ndarray]:
    """The model inputs for rows `index`: tokens / positions / segment_ids [B, T], targets and
    loss_mask [B, T] (1 where the next token belongs to the same document)."""
    tok, seg, pos = rows.tokens[index], rows.segments[index], rows.positions[index]
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {
        "tokens": tok[:, :-1],
        "targets": tok[:, 1:],
        "positions": pos[:, :-1],
        "segment_ids": seg[:, :-1],
        "loss_mask": same_doc.astype(np.float32),
    }


class BatchIterator:
    """Batches of `batch_size` rows in a seeded order per epoch; `state` resumes it exactly."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int):
        if rows.num_rows < batch_size:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {rows.num_rows} packed rows "
                "of the data: use less batch or more data"
            )
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.index = 0, 0
        self.local: np.ndarray | None = None  # rows of each batch this process loads

    def select(self, local: np.ndarray | None) -> None:
        """From now on, load only rows `local` (positions 0..batch_size-1) of every batch: the
        rows of this process's devices in a multi-process run. None = every row."""
        if local is not None and (
            len(local) == 0 or local.min() < 0 or local.max() >= self.batch_size
        ):
            raise ValueError(f"selected rows must be in [0, batch_size={self.batch_size})")
        self.local = local

    @property
    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.rows.num_rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.index + self.batch_size > self.rows.num_rows:  # drop the ragged tail
            self.epoch, self.index = self.epoch + 1, 0
        picked = self._order()[self.index : self.index + self.batch_size]
        batch = make_batch(self.rows, picked if self.local is None else picked[self.local])
        self.index += self.batch_size
        return batch


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int) -> list[dict]:
    """Fixed held-out batches (in row order) for eval loss and perplexity."""
    count = min(rows.num_rows // batch_size, max_batches)
    return [make_batch(rows, np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(count)]
