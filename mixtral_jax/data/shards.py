"""Token shards on disk: what `prepare` writes and training reads, memory-mapped.

Layout of a prepared directory OUT:

  OUT/index.json          written last: format, tokenizer, token dtype, every shard's counts,
                          totals (documents, tokens), bad records skipped
  OUT/tokenizer.model     the tokenizer the shards were encoded with
  OUT/unigram.npy         [V] int64: how often each id occurs after a document's first token
  OUT/shards/NNNNNN.tokens  the documents' token ids, back to back (BOS ... EOS each), raw
  OUT/shards/NNNNNN.docs    [n+1] int64 offsets of the documents in the tokens file, raw
  OUT/shards/NNNNNN.json    the shard's done marker (its input unit, counts), written after
                            both data files are complete: a shard without it is redone

Raw files with the dtype in JSON (uint16 for vocabularies up to 65,536 ids, else int32) are
memory-mapped without a header to parse; the reader keeps at most `OPEN_SHARDS` mapped, so a
corpus of thousands of shards stays within the file-descriptor limit and its resident memory
is what the run touches, not the corpus.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.fileio import atomic_write_text

FORMAT = "mixtral_jax token shards v1"
INDEX = "index.json"
TOKENIZER = "tokenizer.model"
UNIGRAM = "unigram.npy"
SHARDS = "shards"
OPEN_SHARDS = 64
FLUSH_TOKENS = 1 << 20  # tokens a writer buffers before appending them to its file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def is_prepared(path: str) -> bool:
    """Whether `path` is a prepared shard directory (holds an index)."""
    return os.path.isfile(os.path.join(path, INDEX))


def shard_path(out: str, k: int, suffix: str) -> str:
    return os.path.join(out, SHARDS, f"{k:06d}.{suffix}")


class ShardWriter:
    """Writes one shard: `add` documents, then `close(marker)` publishes it."""

    def __init__(self, out: str, k: int, vocab_size: int):
        self.out, self.k = out, k
        self.dtype = token_dtype(vocab_size)
        self.counts = np.zeros(vocab_size, np.int64)
        self.offsets = [0]
        self.max_id = -1
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        os.makedirs(os.path.join(out, SHARDS), exist_ok=True)
        self._tmp = shard_path(out, k, "tokens.tmp")
        with open(self._tmp, "wb"):  # a partial file of an interrupted run starts over
            pass

    def add(self, ids: np.ndarray) -> None:
        """Appends one document's ids [n] (BOS ... EOS)."""
        self._buffer.append(ids)
        self._buffered += len(ids)
        self.offsets.append(self.offsets[-1] + len(ids))
        if self._buffered >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        flat = np.concatenate(self._buffer)
        self.max_id = max(self.max_id, int(flat.max()))
        # the first token of each document (BOS) is never a prediction target
        starts = np.cumsum([0] + [len(b) for b in self._buffer[:-1]])
        targets = np.ones(len(flat), bool)
        targets[starts] = False
        self.counts += np.bincount(flat[targets], minlength=len(self.counts))
        with open(self._tmp, "ab") as f:
            f.write(flat.astype(self.dtype).tobytes())
        self._buffer, self._buffered = [], 0

    def close(self, marker: dict) -> dict:
        """Writes the offsets, renames the data into place, then the marker; returns it."""
        self._flush()
        os.replace(self._tmp, shard_path(self.out, self.k, "tokens"))
        np.asarray(self.offsets, np.int64).tofile(shard_path(self.out, self.k, "docs.tmp"))
        os.replace(shard_path(self.out, self.k, "docs.tmp"), shard_path(self.out, self.k, "docs"))
        np.save(shard_path(self.out, self.k, "counts.npy"), self.counts)
        marker = {
            **marker,
            "docs": len(self.offsets) - 1,
            "tokens": self.offsets[-1],
            "max_id": self.max_id,
        }
        atomic_write_text(shard_path(self.out, self.k, "json"), json.dumps(marker))
        return marker


def read_marker(out: str, k: int) -> dict | None:
    """Shard k's done marker, or None when it is missing or unreadable (redo the shard)."""
    try:
        with open(shard_path(out, k, "json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prepared_tokenizer(path: str, requested: str, setting: str) -> str:
    """The tokenizer file of the prepared directory `path`. `requested` is "auto", "train" or a
    tokenizer file; anything but auto or a file of the same bytes is a ConfigError naming
    `setting`: the shards' ids mean what their own tokenizer says."""
    prepared = os.path.join(path, TOKENIZER)
    if requested == "train":
        raise ConfigError(
            f"data.tokenizer='train' cannot go with the prepared source {path}: its tokens are "
            "fixed by the tokenizer it was prepared with"
        )
    if requested != "auto":
        if not os.path.isfile(requested):
            raise ConfigError(f"tokenizer file {requested} does not exist")
        with open(requested, "rb") as a, open(prepared, "rb") as b:
            if a.read() != b.read():
                raise ConfigError(
                    f"{setting} is not the tokenizer {path} was prepared with ({prepared}); "
                    "leave data.tokenizer=auto"
                )
    return prepared


class ShardSet:
    """The documents of a prepared directory, memory-mapped, in shard order.

    Attributes:
      num_docs, num_tokens: totals.
      index: the parsed index.json.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            with open(os.path.join(path, INDEX)) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}/{INDEX} is not readable: {e}") from None
        if self.index.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a prepared shard directory ({FORMAT!r})")
        self.dtype = np.dtype(self.index["dtype"])
        docs = [s["docs"] for s in self.index["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(docs)]).astype(np.int64)  # [shards+1]
        self.num_docs = int(self.starts[-1])
        self.num_tokens = int(self.index["tokens"])
        self._open: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )

    def _shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(offsets [n+1], tokens) of shard s, mapped; the least recently used one is closed."""
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        k = self.index["shards"][s]["shard"]
        offsets = np.memmap(shard_path(self.path, k, "docs"), np.int64, "r")
        tokens = np.memmap(shard_path(self.path, k, "tokens"), self.dtype, "r")
        if len(offsets) != self.index["shards"][s]["docs"] + 1 or len(tokens) != offsets[-1]:
            raise ConfigError(f"{self.path}: shard {k:06d} is cut short; run prepare again")
        self._open[s] = (offsets, tokens)
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return self._open[s]

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        """Token counts [M] of documents `ids` [M]."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros(len(ids), np.int64)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(shard).tolist():
            at = np.flatnonzero(shard == s)
            offsets, _ = self._shard(s)
            local = ids[at] - self.starts[s]
            out[at] = offsets[local + 1] - offsets[local]
        return out

    def read(self, doc: int, start: int, stop: int) -> np.ndarray:
        """Token ids [stop-start] int32 of document `doc`."""
        s = int(np.searchsorted(self.starts, doc, side="right") - 1)
        offsets, tokens = self._shard(s)
        base = int(offsets[doc - self.starts[s]])
        return np.asarray(tokens[base + start : base + stop], np.int32)

    def unigram_counts(self) -> np.ndarray:
        return np.load(os.path.join(self.path, UNIGRAM))

    def check_ids(self, vocab_size: int) -> None:
        """ConfigError when the shards hold an id outside [0, vocab_size) (model.vocab_size)."""
        top = int(self.index["max_id"])
        if top >= vocab_size:
            raise ConfigError(
                f"data source {self.path} holds token id {top}, outside the model's vocabulary "
                f"of {vocab_size} (model.vocab_size)"
            )
