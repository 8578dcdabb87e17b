"""Bench results go to $OUT, or else the repository's git-ignored out/, never the working
directory (two result files once landed at the repository root and were committed)."""

import json

from bench import common, paths


def test_results_go_to_out_else_the_ignored_out_folder(tmp_path, monkeypatch):
    repo, cwd, out = tmp_path / "repo", tmp_path / "cwd", tmp_path / "device_out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(paths, "ROOT", str(repo))
    monkeypatch.delenv("OUT", raising=False)
    common.write_json("r.json", {"a": 1})
    assert json.loads((repo / "out" / "r.json").read_text()) == {"a": 1}
    assert list(cwd.iterdir()) == []
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    common.write_json("r.json", {"a": 2})
    assert json.loads((out / "r.json").read_text()) == {"a": 2}


def test_the_out_folder_is_ignored():
    with open(f"{paths.ROOT}/.gitignore") as f:
        assert "/out/" in f.read().split()
