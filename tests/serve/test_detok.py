"""Incremental detokenisation against the slow obvious oracle: one decode of all the ids."""

import random

import pytest

from mixtral_jax.serve.detok import TextStream
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path, train_tokenizer

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "Unicode: é, ü, 漢字, emoji 🙂🚀, combining e\u0301, Ω≈ç√",
    "code: def f(x):\n    return x ** 2  # square",
    "[INST] literal markers [/INST] </s> <s>",
]


@pytest.fixture(scope="module")
def mistral():
    return Tokenizer.load(default_tokenizer_path(32000))  # byte fallback: split characters


def _stream(tok, ids, stops=(), rng=None):
    """Feeds ids in random-sized pieces, taking text after each: (stream, taken text)."""
    stream, taken, i = TextStream(tok, stops), [], 0
    rng = rng or random.Random(0)
    while i < len(ids) and not stream.stopped:
        n = rng.randint(1, 3)
        stream.add(ids[i : i + n])
        taken.append(stream.take())
        i += n
    stream.finish()
    taken.append(stream.take(final=True))
    return stream, "".join(taken)


def test_incremental_text_equals_one_decode(mistral):
    rng = random.Random(1)
    for text in SAMPLES:
        ids = mistral.encode(text, bos=False)
        stream, taken = _stream(mistral, ids, rng=rng)
        assert stream.text == taken == mistral.decode(ids), text
    byte_ids = [i for i in range(3, 259)]  # <0x00>..<0xFF>: mostly invalid UTF-8 on its own
    for _ in range(20):
        ids = [rng.choice(byte_ids + list(range(259, 32000))) for _ in range(rng.randint(1, 30))]
        stream, taken = _stream(mistral, ids, rng=rng)
        assert taken == mistral.decode(ids)


def _oracle(tok, ids, stops):
    """(text, kept ids): the shortest prefix of ids whose text holds a stop, cut before it."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        cuts = [text.index(s) for s in stops if s in text]
        if cuts:
            return text[: min(cuts)], ids[:n]
    return tok.decode(ids), ids


def test_stop_strings_cut_like_the_oracle_and_never_leak(mistral):
    rng = random.Random(2)
    for text in SAMPLES:
        ids = mistral.encode(text, bos=False)
        full = mistral.decode(ids)
        for _ in range(6):
            a = rng.randrange(len(full) - 1)
            stops = (full[a : a + rng.randint(1, 4)], "never-there")
            want_text, want_ids = _oracle(mistral, ids, stops)
            stream, taken = _stream(mistral, ids, stops, rng)
            assert (taken, stream.tokens) == (want_text, want_ids), (text, stops)
            assert stream.stopped


def test_held_back_text_is_released_when_it_is_no_stop(mistral):
    ids = mistral.encode("the fox runs fox! more", bos=False)
    upto = {mistral.decode(ids[:n]): n for n in range(len(ids) + 1)}
    stream = TextStream(mistral, ("fox!",))
    stream.add(ids[: upto["the fox"]])
    assert stream.take() == "the "  # "fox" could start "fox!"
    stream.add(ids[upto["the fox"] : upto["the fox runs"]])
    assert stream.take() == "fox runs" and not stream.stopped
    rest = ids[upto["the fox runs"] :]
    assert stream.add(rest) < len(rest)  # the tokens after the stop are dropped
    assert stream.stopped and stream.take() == " " and stream.text == "the fox runs "


@pytest.mark.parametrize("vocab", [32000, 32768, 96])
def test_the_lookup_path_equals_one_decode_on_random_ids_and_skips_most_decodes(vocab, tmp_path):
    """Random ids of every kind (normal pieces, byte pieces, <unk>, control ids, ids past the
    vocabulary) in random-sized pieces: the text equals one decode of all of them, for both of
    Mistral's tokenizers and a small one trained here; a run of normal pieces costs a decode
    only for its first token."""
    if vocab == 96:
        tok = train_tokenizer(SAMPLES * 20, str(tmp_path / "tok.model"), vocab)
    else:
        tok = Tokenizer.load(default_tokenizer_path(vocab))
    rng = random.Random(vocab)
    size = tok.vocab_size
    kinds = [
        list(range(size)),
        [i for i in range(size) if tok._sp.IsByte(i)],  # none where byte fallback is off
        [0, 1, 2, size + 5],
    ]
    kinds = [k for k in kinds if k]
    for _ in range(200):
        ids = [rng.choice(rng.choice(kinds)) for _ in range(rng.randint(1, 40))]
        stream, taken = _stream(tok, ids, rng=rng)
        assert stream.text == taken == tok.decode(ids), ids
    normal = [i for i in range(size // 3, size) if tok.continuation(i) is not None][:100]
    calls = []
    stream = TextStream(tok)
    stream._decode = lambda ids: calls.append(len(ids)) or tok.decode(ids)
    stream.add(normal)
    assert stream.text == tok.decode(normal) and len(calls) == 2  # the first token's window
