"""Training data read into memory: small sources need no `prepare` step.

- Sources: `builtin:pydoc` (the Python documentation topics shipped with the standard library,
  so the default run needs no download), text files (one document per file), JSONL (one document
  per line, its `text` field) and pre-tokenized `.npy` streams (documents end with EOS). A
  directory written by `python -m mixtral_jax.data prepare` is read by `mixtral_jax.data`
  instead, memory-mapped.
- Every document is encoded as BOS ... EOS; from there on both kinds share one pipeline
  (`mixtral_jax.data.loader`, re-exported here): pieces of at most T+1 tokens packed first-fit
  into rows of T+1 tokens, segment ids keeping documents apart (attention never crosses a
  boundary and no loss is taken on a prediction across one; positions restart at every piece;
  id 0 marks padding), a seeded held-out split, a seeded order per epoch, a resumable state saved
  in every checkpoint, and per-process rows (`select`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.data.loader import (  # noqa: F401 - the trainer's data API
    BatchIterator,
    Documents,
    PackedRows,
    Prefetch,
    Split,
    eval_batches,
    make_batch,
    pack,
    unigram_entropy,
)
from mixtral_jax.data.records import read_text

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


def split_documents(documents: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) documents by `Split` (held-out ones in eval order); at least one of
    each when there are two or more."""
    split = Split(len(documents), eval_fraction, seed)
    held = split.held().tolist()
    is_held = set(held)
    return [d for i, d in enumerate(documents) if i not in is_held], [documents[i] for i in held]
