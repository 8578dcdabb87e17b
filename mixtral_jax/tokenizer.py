"""SentencePiece tokenizers: Mistral's official one, or one trained on your text.

Encoding follows Mistral's tokenizer: BOS first (id 1), EOS (id 2) only when asked, no padding id
of its own (padding uses 0 = <unk> under a mask).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import sentencepiece as spm

from mixtral_jax.config import ConfigError

MISTRAL_FILES = {
    32000: "tokenizer.model.v1",  # Mixtral 8x7B
    32768: "mistral_instruct_tokenizer_240323.model.v3",  # Mixtral 8x22B (v3, with control tokens)
}


def default_tokenizer_path(vocab_size: int = 32000) -> str:
    """Mistral's official tokenizer file for a vocabulary size (32000: v1, 32768: v3), as shipped
    by the `mistral-common` package."""
    if vocab_size not in MISTRAL_FILES:
        raise ConfigError(
            f"no official Mistral tokenizer has {vocab_size} tokens "
            f"(known: {', '.join(map(str, MISTRAL_FILES))})"
        )
    try:
        import mistral_common
    except ImportError:
        raise ConfigError(
            "the default Mistral tokenizer needs `pip install mistral-common`; "
            "or pass a tokenizer file"
        ) from None
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", MISTRAL_FILES[vocab_size])
    if not os.path.isfile(path):
        raise ConfigError(f"mistral-common has no {MISTRAL_FILES[vocab_size]} at {path}")
    return path


class Tokenizer:
    """A loaded SentencePiece model."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path
        self._continuations: dict[int, str | None] = {}

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        if not os.path.isfile(path):
            raise ConfigError(f"tokenizer file {path} does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{path} is not a sentencepiece model: {e}") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Id used to fill padded positions (always masked): the model's own pad, else <unk>."""
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: list[str], *, bos: bool = True, eos: bool = False, num_threads: int = 1
    ) -> list[list[int]]:
        """`encode` of each text, in one sentencepiece call on `num_threads` threads."""
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in self._sp.encode(list(texts), num_threads=num_threads)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Ids past the tokenizer's vocabulary (a model whose embedding is
        padded beyond it can sample them) have no text: they are left out, not an error."""
        size = self.vocab_size
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < size])

    def continuation(self, token_id: int) -> str | None:
        """The text a normal piece adds after tokens that have text of their own: its piece with
        '▁' as a space (`decode(ids + [t]) == decode(ids) + continuation(t)` when `decode(ids)`
        is not empty; a first piece loses its leading space instead). None for a byte piece (a
        character may span several), a control, unknown or unused piece, or an id past the
        vocabulary: only a decode says what those add. Cached per id."""
        token_id = int(token_id)
        if token_id not in self._continuations:
            sp, normal = self._sp, 0 <= token_id < self.vocab_size
            if normal:
                normal = not (
                    sp.IsByte(token_id)
                    or sp.IsControl(token_id)
                    or sp.IsUnknown(token_id)
                    or sp.IsUnused(token_id)
                )
            self._continuations[token_id] = (
                sp.IdToPiece(token_id).replace("\u2581", " ") if normal else None
            )
        return self._continuations[token_id]

    def silent(self, token_id: int) -> bool:
        """Whether the token decodes to no text at all: a control or unused piece, or an id past
        the vocabulary."""
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            return True
        return bool(self._sp.IsControl(token_id) or self._sp.IsUnused(token_id))

    def piece(self, token_id: int) -> str:
        """The text of one token as it reads inside a sentence (SentencePiece's '▁' is a space);
        "" for an id past the vocabulary (see `decode`)."""
        if not 0 <= int(token_id) < self.vocab_size:
            return ""
        return self._sp.id_to_piece(int(token_id)).replace("\u2581", " ")


def train_tokenizer(texts: Iterable[str], path: str, vocab_size: int) -> Tokenizer:
    """Trains a BPE SentencePiece model on `texts` with Mistral's special ids and writes `path`.

    Ids: <unk> 0, <s> 1, </s> 2, as Mistral's tokenizer; digits split, byte fallback off (small
    vocabularies cannot afford 256 byte pieces).
    """
    if vocab_size < 16:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} must be >= 16")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for t in texts if t.strip()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        max_sentence_length=1 << 20,
        hard_vocab_limit=False,
        num_threads=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer.load(path)


def main(argv=None) -> int:
    """`python -m mixtral_jax.tokenizer train-tokenizer --data SOURCE --vocab-size N --out F`."""
    import argparse
    import sys

    from mixtral_jax.train import data

    p = argparse.ArgumentParser(prog="python -m mixtral_jax.tokenizer")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-tokenizer", help="train a BPE sentencepiece model on text")
    t.add_argument(
        "--data",
        default=data.BUILTIN_PYDOC,
        help="builtin:pydoc, a .txt/.jsonl file or a directory of them",
    )
    t.add_argument("--vocab-size", type=int, default=512)
    t.add_argument("--out", required=True, help="where to write the .model file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if os.path.exists(args.out):
            raise ConfigError(f"--out {args.out} already exists")
        docs = [d for d in data.read_documents(args.data) if isinstance(d, str)]
        if not docs:
            raise ConfigError(f"{args.data} holds no text to train a tokenizer on")
        tokenizer = train_tokenizer(
            [p for d in docs for p in d.split("\n\n")], args.out, args.vocab_size
        )
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {tokenizer.vocab_size} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
