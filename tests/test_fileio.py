"""Directories and files appear whole or not at all; JSON files fail in one named line."""

import os

import pytest

from mixtral_jax.config import ConfigError
from mixtral_jax.fileio import atomic_directory, atomic_write_text, read_json


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "deep" / "out"
    with atomic_directory(str(target)) as staging:
        assert staging == str(target) + ".partial" and os.listdir(staging) == []
        (tmp_path / "deep" / "out.partial" / "a").write_text("1")
        assert not target.exists()
    assert os.listdir(target) == ["a"] and not os.path.exists(staging)
    with pytest.raises(RuntimeError), atomic_directory(str(tmp_path / "failed")) as staging:
        open(os.path.join(staging, "half"), "w").close()
        raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["deep"]
    with atomic_directory(str(target), overwrite=True) as staging:
        (tmp_path / "deep" / "out.partial" / "b").write_text("2")
    assert os.listdir(target) == ["b"]
    with pytest.raises(OSError), atomic_directory(str(target)) as staging:  # no overwrite
        (tmp_path / "deep" / "out.partial" / "c").write_text("3")
    assert os.listdir(target) == ["b"] and not os.path.exists(staging)


def test_atomic_directory_of_a_process_that_does_not_own_it_touches_nothing(tmp_path):
    with atomic_directory(str(tmp_path / "x"), owner=False) as staging:
        assert staging == str(tmp_path / "x") + ".partial"
    assert os.listdir(tmp_path) == []


def test_atomic_write_text_and_read_json(tmp_path):
    path = str(tmp_path / "m.json")
    atomic_write_text(path, '{"a": [1, 2]}')
    assert read_json(path, "manifest") == {"a": [1, 2]} and os.listdir(tmp_path) == ["m.json"]
    with pytest.raises(ConfigError, match=f"^no manifest at {tmp_path}/nothing.json$"):
        read_json(str(tmp_path / "nothing.json"), "manifest")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json is not valid JSON: Expecting property"):
        read_json(str(tmp_path / "bad.json"), "manifest")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ConfigError, match=r"latin.json is not valid JSON: not UTF-8"):
        read_json(str(tmp_path / "latin.json"), "manifest")
    with pytest.raises(ConfigError, match="cannot read manifest"):
        read_json(str(tmp_path), "manifest")  # a directory
