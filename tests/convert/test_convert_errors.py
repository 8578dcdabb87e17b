"""Bad inputs to the converter: each is named in one error, exit code 1, nothing written.

Sources are built with numpy and our own safetensors writer (fast; no torch) except the pickle
cases, which need torch to make the pickles.
"""

import json
import os
import pickle
import struct

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.convert import cli
from mixtral_jax.convert import safetensors_io as st
from mixtral_jax.hf.weights import hf_shapes

CFG = mj.ModelConfig.tiny(
    vocab_size=32,
    embed_dim=16,
    hidden_dim=24,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    num_experts=3,
)


def state(cfg=CFG, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in hf_shapes(cfg).items()}


def write(path, tensors: dict) -> None:
    w = st.StreamWriter(str(path), [(k, v.dtype, v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        w.write(k, v)
    w.close()


def hf_dir(root, tensors=None, cfg=CFG, **hf_changes):
    root.mkdir()
    write(root / "model.safetensors", state(cfg) if tensors is None else tensors)
    (root / "config.json").write_text(json.dumps(dict(mj.to_hf_dict(cfg), **hf_changes)))
    return root


def fails(tmp_path, capsys, args, *messages):
    """Runs the CLI, expects exit 1, every message in stderr, and no output written."""
    before = sorted(os.listdir(tmp_path))
    dst = tmp_path / "dst"
    assert cli.main([*args[:1], str(args[1]), str(dst), "--quiet", *args[2:]]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for m in messages:
        assert m in err, err
    assert sorted(os.listdir(tmp_path)) == before  # no dst, no dst.partial
    return err


def test_missing_unexpected_and_misshapen_tensors_are_listed_together(tmp_path, capsys):
    t = state()
    del t["model.layers.1.block_sparse_moe.experts.2.w2.weight"]
    t["lm_head.bias"] = np.zeros(32, np.float32)
    t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 17), np.float32)
    src = hf_dir(tmp_path / "src", t)
    err = fails(
        tmp_path,
        capsys,
        ["to-orbax", src],
        "3 problem(s), nothing was written",
        "missing tensor model.layers.1.block_sparse_moe.experts.2.w2.weight",
        "unexpected tensor lm_head.bias",
        "size mismatch for model.layers.0.self_attn.q_proj.weight: "
        "checkpoint [16, 17], config [16, 16]",
    )
    assert err.startswith("error: ")


def test_config_that_disagrees_with_the_weights(tmp_path, capsys):
    src = hf_dir(tmp_path / "src", state(), num_local_experts=2, num_experts_per_tok=1)
    fails(
        tmp_path,
        capsys,
        ["to-orbax", src],
        "unexpected tensor model.layers.0.block_sparse_moe.experts.2.w1.weight",
        "size mismatch for model.layers.0.block_sparse_moe.gate.weight: checkpoint [3, 16], "
        "config [2, 16]",
    )


def test_invalid_config_is_reported(tmp_path, capsys):
    src = hf_dir(tmp_path / "src", state(), num_experts_per_tok=9)
    fails(tmp_path, capsys, ["to-orbax", src], "num_experts_per_tok=9: must be <= num_experts=3")


@pytest.mark.parametrize(
    "keep,message",
    [
        (0, "truncated (0 bytes, no header length)"),
        (7, "truncated (7 bytes, no header length)"),
        (20, "header length 3752 exceeds the file (20 bytes)"),
        ("half", "truncated: data ends at byte"),
        (-1, "truncated: data ends at byte"),
    ],
)
def test_truncated_files(tmp_path, capsys, keep, message):
    src = hf_dir(tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    keep = len(data) // 2 if keep == "half" else keep % len(data) if keep < 0 else keep
    (src / "model.safetensors").write_bytes(data[:keep])
    fails(tmp_path, capsys, ["to-orbax", src], f"model.safetensors: {message}")


def _header(entries: dict, data: bytes) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob,message",
    [
        (struct.pack("<Q", 2**63) + b"{}", "exceeds the file"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            struct.pack("<Q", 47)
            + b'{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"a":1}'[:47]
            + b"\0" * 4,
            "not valid UTF-8 JSON",
        ),
        (
            _header(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            "overlapping or gapped offsets",
        ),
        (
            _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
            "spans 8 bytes, its shape [3] x float32 needs 12",
        ),
        (
            _header({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "malformed entry",
        ),
        (
            _header({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
            "malformed entry",
        ),
    ],
)
def test_corrupt_headers(tmp_path, capsys, blob, message):
    src = hf_dir(tmp_path / "src")
    (src / "model.safetensors").write_bytes(blob)
    fails(tmp_path, capsys, ["to-orbax", src], message)


def test_duplicate_tensor_names_in_a_header(tmp_path, capsys):
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    raw = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    src = hf_dir(tmp_path / "src")
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    fails(tmp_path, capsys, ["to-orbax", src], "duplicate tensor name 'a'")


def _sharded(root, t, weight_map=None):
    root.mkdir()
    keys = list(t)
    half = len(keys) // 2
    write(root / "a.safetensors", {k: t[k] for k in keys[:half]})
    write(root / "b.safetensors", {k: t[k] for k in keys[half:]})
    mapping = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(keys)}
    mapping.update(weight_map or {})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": mapping}))
    (root / "config.json").write_text(json.dumps(mj.to_hf_dict(CFG)))
    return root, keys


def test_broken_shard_indexes(tmp_path, capsys):
    t = state()
    src, keys = _sharded(tmp_path / "src", t)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][keys[0]] = "b.safetensors"  # a key absent from the shard named
    index["weight_map"]["extra.weight"] = "../outside.safetensors"  # a path out of the dir
    index["weight_map"]["more.weight"] = "c.safetensors"  # a shard that does not exist
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    write(tmp_path / "outside.safetensors", {"extra.weight": np.zeros(1, np.float32)})
    fails(
        tmp_path,
        capsys,
        ["to-orbax", src],
        f"index maps {keys[0]!r} to b.safetensors, but it is in a.safetensors",
        "shard '../outside.safetensors' points outside",
        "shard 'c.safetensors' does not exist",
    )


def test_symlinked_shard_out_of_the_directory_and_bad_index_json(tmp_path, capsys):
    t = state()
    src, _ = _sharded(tmp_path / "src", t)
    os.replace(src / "b.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", src / "b.safetensors")
    fails(tmp_path, capsys, ["to-orbax", src], "shard 'b.safetensors' points outside")
    (src / "model.safetensors.index.json").write_text("{not json")
    fails(tmp_path, capsys, ["to-orbax", src], "is not a valid shard index")


def test_wrong_and_mixed_dtypes(tmp_path, capsys):
    t = state()
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float64)
    fails(
        tmp_path,
        capsys,
        ["to-orbax", hf_dir(tmp_path / "f64", t)],
        "model.norm.weight has dtype float64: weights must be float32, bfloat16 or float16",
    )
    t = state()
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.float16)
    fails(
        tmp_path,
        capsys,
        ["to-orbax", hf_dir(tmp_path / "mixed", t)],
        "tensors mix dtypes ['float16', 'float32']: pass --dtype",
    )


def test_check_finite_names_every_bad_tensor(tmp_path, capsys):
    t = state()
    t["model.layers.0.block_sparse_moe.experts.1.w3.weight"][2, 3] = np.nan
    t["lm_head.weight"][0, :2] = np.inf
    src = hf_dir(tmp_path / "src", t)
    fails(
        tmp_path,
        capsys,
        ["to-orbax", src, "--check-finite"],
        "model.layers.0.block_sparse_moe.experts.1.w3.weight has 1 non-finite value(s)",
        "lm_head.weight has 2 non-finite value(s)",
    )


def test_existing_output_and_missing_source(tmp_path, capsys):
    src = hf_dir(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    assert cli.main(["to-orbax", str(src), str(tmp_path / "dst"), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(tmp_path / "dst") == ["keep.txt"]
    (tmp_path / "dst" / "keep.txt").unlink()
    (tmp_path / "dst").rmdir()
    fails(tmp_path, capsys, ["to-orbax", tmp_path / "nowhere"], "does not exist")
    fails(tmp_path, capsys, ["to-hf", src], "is not a model checkpoint")
    fails(
        tmp_path,
        capsys,
        ["to-orbax", tmp_path / "src", "--tokenizer", "/no/tok.model"],
        "tokenizer /no/tok.model does not exist",
    )


class _Exploit:
    """Pickles as a call to os.system: loading it with plain pickle would create the file."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickles_are_refused_and_a_malicious_one_never_runs(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(mj.to_hf_dict(CFG)))
    sentinel = tmp_path / "pwned"
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _Exploit(sentinel)}, f)
    torch.save({"model.norm.weight": _Exploit(sentinel)}, str(src / "consolidated.00.pth"))
    fails(
        tmp_path,
        capsys,
        ["to-orbax", src],
        "holds only pickle weights",
        "convert them to safetensors, or pass --allow-pickle",
    )
    fails(
        tmp_path,
        capsys,
        ["to-orbax", src, "--allow-pickle"],
        "pytorch_model.bin: refused by torch.load(weights_only=True)",
        "consolidated.00.pth: refused by torch.load(weights_only=True)",
    )
    assert not sentinel.exists()
