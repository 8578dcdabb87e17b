"""Data pipeline: sources, tokenizers, packing with document boundaries, resumable order."""

import json

import numpy as np
import pytest

from mixtral_jax import tokenizer
from mixtral_jax.config import ConfigError
from mixtral_jax.train import data


class _Ids:
    """A stand-in tokenizer: one id per character (BOS 1, EOS 2)."""

    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [3 + ord(c) % 50 for c in text] + [2] * eos


def test_sources_text_jsonl_npy_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    np.save(tmp_path / "c.npy", np.array([1, 5, 6, 2, 1, 7, 2], np.int32))
    docs = data.read_documents(str(tmp_path))
    assert docs[:3] == ["first document", "second", "third"]
    pieces = data.tokenize_documents(docs, _Ids())
    assert len(pieces) == 5  # 3 texts + the .npy stream split after each EOS
    np.testing.assert_array_equal(pieces[3], [1, 5, 6, 2])
    assert pieces[0][0] == 1 and pieces[0][-1] == 2
    assert len(data.read_documents(data.BUILTIN_PYDOC)) > 50


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        data.read_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 is not a JSON object with a 'text'"):
        data.read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .txt"):
        data.read_documents(str(tmp_path / "empty"))


def test_packing_keeps_documents_apart_in_attention_and_loss():
    docs = [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 3, 9, 4)]
    rows = data.pack(docs, seq_len=9, seed=0)  # rows of 10 tokens
    assert rows.tokens.shape[1] == 10
    # Every document token appears exactly once; long documents are cut into pieces.
    real = rows.tokens[rows.segments > 0]
    assert sorted(real.tolist()) == sorted(np.concatenate(docs).tolist())
    batch = data.make_batch(rows, np.arange(rows.num_rows))
    for r in range(rows.num_rows):
        seg, pos = rows.segments[r], rows.positions[r]
        for t in range(9):
            same = seg[t] == seg[t + 1] and seg[t + 1] > 0
            assert batch["loss_mask"][r, t] == float(same)
        for s in set(seg[seg > 0].tolist()):  # positions restart at 0 in every piece
            np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))


def _iterator(batch_size, seed, copies=12):
    docs = data.Documents([np.arange(3, 40, dtype=np.int32) + i for i in range(copies)])
    return data.BatchIterator(docs, data.Split(copies, 0.0, 0), batch_size, 15, seed)


def test_iterator_order_is_seeded_and_resumes_exactly():
    a = _iterator(2, seed=7)
    seen = [next(a)["tokens"] for _ in range(5)]
    b = _iterator(2, seed=7)
    for _ in range(3):
        next(b)
    c = _iterator(2, seed=7)
    c.restore(b.state)
    np.testing.assert_array_equal(next(c)["tokens"], seen[3])
    other = _iterator(2, seed=8)
    assert any(not np.array_equal(next(other)["tokens"], s) for s in seen)
    with pytest.raises(ConfigError, match="batch_size=999 exceeds"):
        _iterator(999, seed=0)


def test_a_process_loads_only_its_rows_of_each_batch():
    full, mine = _iterator(4, seed=7, copies=24), _iterator(4, seed=7, copies=24)
    mine.select(np.array([1, 3]))
    for _ in range(4):  # across an epoch boundary too
        want, got = next(full), next(mine)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k][[1, 3]])
    assert mine.state == full.state  # the checkpointed position does not depend on the slice
    with pytest.raises(ValueError, match=r"selected rows must be in \[0, batch_size=4\)"):
        mine.select(np.array([4]))


def test_held_out_split_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(40)]
    train, held = data.split_documents(docs, 0.1, seed=3)
    assert len(held) == 4 and not set(train) & set(held)
    assert data.split_documents(docs, 0.1, seed=3) == (train, held)
    with pytest.raises(ConfigError, match="eval_fraction=1.5"):
        data.split_documents(docs, 1.5, seed=0)


def test_mistral_tokenizer_and_train_tokenizer_command(tmp_path, capsys):
    mistral = tokenizer.Tokenizer.load(tokenizer.default_tokenizer_path())
    assert mistral.vocab_size == 32000
    assert mistral.encode("Hello world") == [1, 22557, 1526]  # BOS first, as Mistral encodes
    assert mistral.decode(mistral.encode("Hello world")) == "Hello world"
    (tmp_path / "c.txt").write_text("the cat sat on the mat\n\nthe dog sat on the log\n" * 30)
    out = tmp_path / "t.model"
    assert (
        tokenizer.main(
            [
                "train-tokenizer",
                "--data",
                str(tmp_path / "c.txt"),
                "--vocab-size",
                "40",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    trained = tokenizer.Tokenizer.load(str(out))
    assert trained.bos_id == 1 and trained.eos_id == 2
    assert trained.decode(trained.encode("the cat sat")) == "the cat sat"
    assert tokenizer.main(["train-tokenizer", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="is not a sentencepiece model"):
        tokenizer.Tokenizer.load(str(tmp_path / "c.txt"))


def test_binary_and_malformed_sources_are_named_by_file_and_place(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode() + b"ol\xe9")
    with pytest.raises(ConfigError, match=r"latin1.txt is not UTF-8 text: byte 0xe9 at line 2"):
        data.read_documents(str(tmp_path / "latin1.txt"))
    (tmp_path / "blob.txt").write_bytes(b"ab\n\ncd\x00\x01\x02")  # valid UTF-8, but binary
    with pytest.raises(ConfigError, match=r"byte 0x00 at line 3, offset 6 \(a binary file"):
        data.read_documents(str(tmp_path / "blob.txt"))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ConfigError, match=r"b.jsonl is not UTF-8 text: byte 0xff at line 2"):
        data.read_documents(str(tmp_path / "b.jsonl"))
    (tmp_path / "n.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(ConfigError, match=r"n.jsonl:1 is not a JSON object with a 'text'"):
        data.read_documents(str(tmp_path / "n.jsonl"))
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r")
    assert data.read_documents(str(tmp_path / "crlf.txt")) == ["one\ntwo\n"]  # as text mode


def test_bad_npy_sources_and_out_of_vocabulary_ids_are_named(tmp_path):
    np.save(tmp_path / "f.npy", np.ones(4, np.float32))
    with pytest.raises(ConfigError, match=r"f.npy holds a float32 array of shape \(4,\)"):
        data.read_documents(str(tmp_path / "f.npy"))
    np.save(tmp_path / "neg.npy", np.array([1, -3, 2]))
    with pytest.raises(ConfigError, match=r"neg.npy holds token id -3, outside \[0, 2\*\*31\)"):
        data.read_documents(str(tmp_path / "neg.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ConfigError, match=r"junk.npy is not a readable .npy array"):
        data.read_documents(str(tmp_path / "junk.npy"))
    docs = [np.array([1, 5, 2]), np.array([1, 511, 512, 2])]
    data.check_token_ids(docs[:1], 512, "s.npy")
    with pytest.raises(ConfigError, match=r"s.npy holds token id 512, outside the model's vocab"):
        data.check_token_ids(docs, 512, "s.npy")
