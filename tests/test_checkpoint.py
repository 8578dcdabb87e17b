"""Model checkpoints: whole-tree and streamed (leaf by leaf) saves read back equal; failures
leave nothing behind; a config that disagrees with the stored shapes is refused."""

import json
import os

import ml_dtypes
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.config import ConfigError
from mixtral_jax.convert import importer, open_source

CFG = mj.ModelConfig.tiny(vocab_size=40, embed_dim=16, hidden_dim=24, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, num_experts=3, param_dtype="bfloat16")


def _params(seed=0):
    params = checkpoint.to_numpy(mj.get_params(mj.init(CFG, seed)))
    assert params["lm_head"].dtype == ml_dtypes.bfloat16
    return params


def _leaves(params, prefix=()):
    for name, value in params.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (name,))
        else:
            yield prefix + (name,), value


def _assert_same(a, b):
    for (pa, x), (pb, y) in zip(sorted(_leaves(a)), sorted(_leaves(b)), strict=True):
        assert pa == pb and x.dtype == y.dtype and x.tobytes() == y.tobytes(), pa


def test_streamed_and_whole_saves_read_back_bit_exact(tmp_path):
    params = _params()
    checkpoint.save_model(str(tmp_path / "whole"), params, CFG)
    checkpoint.save_model_streaming(str(tmp_path / "streamed"), _leaves(params), CFG)
    for name in ("whole", "streamed"):
        assert checkpoint.is_model_checkpoint(str(tmp_path / name))
        cfg, loaded = checkpoint.load_model(str(tmp_path / name))
        assert cfg == CFG
        _assert_same(params, checkpoint.to_numpy(loaded))
    assert sorted(os.listdir(tmp_path)) == ["streamed", "whole"]
    with pytest.raises(FileExistsError, match="already exists"):
        checkpoint.save_model_streaming(str(tmp_path / "whole"), _leaves(params), CFG)


def test_a_failing_stream_leaves_nothing(tmp_path):
    def leaves():
        yield from list(_leaves(_params()))[:3]
        raise ConfigError("stopped halfway")

    with pytest.raises(ConfigError, match="stopped halfway"):
        checkpoint.save_model_streaming(str(tmp_path / "ckpt"), leaves(), CFG)
    assert os.listdir(tmp_path) == []


def test_config_that_disagrees_with_stored_shapes_is_refused(tmp_path):
    checkpoint.save_model_streaming(str(tmp_path / "ckpt"), _leaves(_params()), CFG)
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    hf["num_local_experts"] = 4
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=r"layers.moe.router has shape \(2, 16, 3\), config "
                                          r"says \(2, 16, 4\)"):
        checkpoint.load_model(str(tmp_path / "ckpt"))


def test_memory_mapped_scratch_leaves_convert_identically(tmp_path, monkeypatch):
    params = _params(1)
    from mixtral_jax.convert import write_hf

    write_hf(params, CFG, str(tmp_path / "hf"), progress=False)
    monkeypatch.setattr(importer, "SCRATCH_MIN_BYTES", 0)  # every leaf through a memmap file
    importer.to_orbax(str(tmp_path / "hf"), str(tmp_path / "ours"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf", "ours"]  # scratch removed
    _, loaded = checkpoint.load_model(str(tmp_path / "ours"))
    _assert_same(params, checkpoint.to_numpy(loaded))
    _assert_same(params, importer.build_params(open_source(str(tmp_path / "hf")),
                                               progress=False))
