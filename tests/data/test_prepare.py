"""The prepare command: every source format in order, any cut into units, parallel workers,
bad records as one line naming file and line (or counted), and a resume that keeps finished
shards."""

import gzip
import json

import numpy as np
import pytest

from mixtral_jax.data import prepare, records, shards
from mixtral_jax.tokenizer import Tokenizer, default_tokenizer_path

TEXTS = [f"document {i}: " + "the cat sat on the mat. " * (i % 5 + 1) for i in range(30)]


@pytest.fixture(scope="module")
def mistral():
    return Tokenizer.load(default_tokenizer_path())


def _jsonl(path, texts, extra=b""):
    lines = [json.dumps({"text": t, "id": i}).encode() for i, t in enumerate(texts)]
    path.write_bytes(b"\n".join(lines[:3]) + b"\n\n" + b"\r\n".join(lines[3:]) + b"\n" + extra)


def _docs(out) -> list[list[int]]:
    s = shards.ShardSet(str(out))
    return [s.read(d, 0, int(s.lengths([d])[0])).tolist() for d in range(s.num_docs)]


def _expected(tok, texts):
    return [tok.encode(t, bos=True, eos=True) for t in texts if t.strip()]


def test_sources_in_order_in_any_cut_and_with_parallel_workers(tmp_path, mistral):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(TEXTS[0])
    (corpus / "blank.txt").write_text("  \n")  # no tokens: no document
    _jsonl(corpus / "b.jsonl", TEXTS[1:20])
    with gzip.open(corpus / "sub" / "c.jsonl.gz", "wb") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[20:]).encode())
    want = _expected(mistral, [TEXTS[0]] + TEXTS[1:])
    one = prepare.prepare(
        [str(corpus)], str(tmp_path / "one"), "mistral", workers=1, progress=False
    )
    assert len(one["shards"]) == 4  # a.txt | b.jsonl | blank.txt | sub/c.jsonl.gz (sorted)
    assert _docs(tmp_path / "one") == want
    # byte ranges of 200 B cut the JSONL file mid-line: every line is read exactly once
    cut = prepare.prepare(
        [str(corpus / "*.txt"), str(corpus / "b.jsonl"), str(corpus / "sub")],
        str(tmp_path / "cut"),
        "mistral",
        workers=2,
        unit_bytes=200,
        progress=False,
    )
    assert len(cut["shards"]) > 10
    assert _docs(tmp_path / "cut") == want
    s = shards.ShardSet(str(tmp_path / "cut"))
    assert s.num_tokens == sum(map(len, want)) and s.dtype == np.uint16
    flat = np.concatenate([np.array(d[1:]) for d in want])
    np.testing.assert_array_equal(s.unigram_counts(), np.bincount(flat, minlength=32000))


def test_parquet_rows_in_order(tmp_path, mistral):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"body": TEXTS[:10], "n": list(range(10))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)  # 3 row groups: 3 units
    out = tmp_path / "out"
    args = ["prepare", str(tmp_path / "d.parquet"), str(out), "--tokenizer", "mistral"]
    assert prepare.main([*args, "--text-field", "body", "--quiet", "--workers", "1"]) == 0
    assert _docs(out) == _expected(mistral, TEXTS[:10])
    assert len(shards.ShardSet(str(out)).index["shards"]) == 3
    bad = pa.table({"body": ["fine", None]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(
        prepare.ConfigError, match=r"bad.parquet:row 2: 'body' is null, not a string"
    ):
        prepare.prepare(
            [str(tmp_path / "bad.parquet")],
            str(tmp_path / "o2"),
            "mistral",
            workers=1,
            field="body",
            progress=False,
        )
    with pytest.raises(
        prepare.ConfigError, match=r"d.parquet: no column 'text' \(columns: body, n\)"
    ):
        prepare.prepare(
            [str(tmp_path / "d.parquet")],
            str(tmp_path / "o3"),
            "mistral",
            workers=1,
            progress=False,
        )


@pytest.mark.parametrize(
    "line,message",
    [
        (b'{"txt": "no text field"}', r"no 'text' field"),
        (b'{"text": "broken', r"not valid JSON: Unterminated string"),
        (b'{"text": "caf\xe9"}', r"not UTF-8: byte 0xe9 at column 14"),
        (b'{"text": 5}', r"'text' is a int, not a string"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_and_line(tmp_path, capsys, line, message):
    good = [json.dumps({"text": t}).encode() for t in TEXTS[:12]]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(good[:9] + [line] + good[9:]) + b"\n")
    args = ["prepare", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--tokenizer", "mistral"]
    # 315-byte units: line 10 lies in a later unit than the first, counted across the cut
    args += ["--workers", "1", "--unit-mb", "0.0003", "--quiet"]
    assert prepare.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {tmp_path / 'c.jsonl'}:10: ") and message in err.replace(
        "\\", ""
    )
    assert err.endswith("(--skip-bad skips bad records)")
    assert prepare.main([*args, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert (
        "12 documents" in out
        and f"skipped 1 bad records (first: {tmp_path / 'c.jsonl'}:10: " in out
    )


def test_a_bad_text_file_and_a_bad_gzip_file_are_named(tmp_path, capsys):
    (tmp_path / "t.txt").write_bytes(b"fine\nol\xe9")
    with pytest.raises(prepare.ConfigError, match=r"t.txt is not UTF-8 text: byte 0xe9 at line 2"):
        prepare.prepare(
            [str(tmp_path / "t.txt")], str(tmp_path / "o1"), "mistral", workers=1, progress=False
        )
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-20])
    with pytest.raises(
        prepare.ConfigError, match=r"g.jsonl.gz: not a readable gzip file after line"
    ):
        prepare.prepare(
            [str(tmp_path / "g.jsonl.gz")],
            str(tmp_path / "o2"),
            "mistral",
            workers=1,
            progress=False,
        )
    with pytest.raises(
        prepare.ConfigError,
        match=r"source .*nothing\*.jsonl does not exist or matches no corpus file",
    ):
        prepare.prepare(
            [str(tmp_path / "nothing*.jsonl")], str(tmp_path / "o3"), "mistral", progress=False
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.md").write_text("mine")
    with pytest.raises(
        prepare.ConfigError, match=r"taken exists and is not a prepared shard directory"
    ):
        prepare.prepare(
            [str(tmp_path / "t.txt")], str(tmp_path / "taken"), "mistral", progress=False
        )


def test_an_interrupted_prepare_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    _jsonl(corpus / "a.jsonl", TEXTS)
    _jsonl(corpus / "b.jsonl", TEXTS[:5])
    args = ([str(corpus)], str(tmp_path / "out"), "mistral")
    kw = {"workers": 1, "unit_bytes": 400, "progress": False}
    ref = prepare.prepare(args[0], str(tmp_path / "ref"), "mistral", **kw)
    units = len(ref["shards"])
    assert units >= 6
    original, done = prepare._Job.run, []

    def interrupted_at_the_fourth(self, k, unit):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(k)
        return original(self, k, unit)

    monkeypatch.setattr(prepare._Job, "run", interrupted_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(*args, **kw)
    assert not shards.is_prepared(args[1])  # no index until every shard is in
    monkeypatch.setattr(
        prepare._Job, "run", lambda self, k, u: done.append(k) or original(self, k, u)
    )
    prepare.prepare(*args, **kw)
    assert done == list(range(units))  # shards 0-2 in the first run, the rest in the second
    assert _docs(args[1]) == _docs(tmp_path / "ref")
    with open(corpus / "b.jsonl", "ab") as f:  # a changed file: only its shards are redone
        f.write(json.dumps({"text": "one more"}).encode() + b"\n")
    done.clear()
    prepare.prepare(*args, **kw)
    b_units = [
        k
        for k, u in enumerate(records.plan_units(records.source_files(args[0]), 400))
        if u.paths[0].endswith("b.jsonl")
    ]
    assert done == b_units and len(_docs(args[1])) == len(_docs(tmp_path / "ref")) + 1
