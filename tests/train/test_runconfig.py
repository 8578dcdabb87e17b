"""Run configs: the shipped TOML files load, unknown keys and wrong types are one-line errors."""

import os

import pytest

import mixtral_jax as mj
from mixtral_jax.config import ConfigError
from mixtral_jax.train.config import RunConfig, compute_overrides, load_run_config, to_dict

CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)


@pytest.mark.parametrize("name", sorted(os.listdir(CONFIGS)))
def test_shipped_configs_load(name):
    cfg = load_run_config(os.path.join(CONFIGS, name))
    assert isinstance(cfg, RunConfig) and cfg.train.steps > 0
    assert to_dict(cfg)["model"]["num_layers"] == cfg.model.num_layers


def test_presets_overrides_and_defaults():
    cfg = load_run_config(
        os.path.join(CONFIGS, "mixtral_8x7b.toml"),
        ["--model.num_layers=4", "train.lr=2e-4", "checkpoint.async_save=false"],
    )
    assert cfg.model == mj.preset("mixtral-8x7b", num_layers=4, dtype="bfloat16", remat="full")
    assert cfg.train.lr == 2e-4 and cfg.checkpoint.async_save is False
    assert load_run_config(None).model == mj.preset("tiny")


@pytest.mark.parametrize(
    "toml,message",
    [
        ("[trian]\nsteps = 3\n", "unknown config key 'trian'"),
        ("[train]\nstep = 3\n", "unknown config key 'train.step'"),
        ("[model]\npreset = 'tiny'\nexperts = 3\n", "unknown config key 'model.experts'"),
        ("[train]\nsteps = 'ten'\n", "train.steps='ten': must be of type int"),
        ("[train]\nlr = true\n", "train.lr=True: must be of type float"),
        (
            "[model]\npreset = 'tiny'\nhf_config = 'x'\n",
            "model.preset and model.hf_config are exclusive",
        ),
        (
            "[model]\nmoe_impl = 'sparse'\n",
            "model.moe_impl='sparse': must be one of dense, dropless, capacity",
        ),
        ("seed = 1\n[train\n", "is not valid TOML"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_run_config(str(path))
    assert message in str(err.value)


def test_bad_overrides_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="override 'train.steps' must look like key=value"):
        load_run_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="num_heads=4: must be divisible by num_kv_heads=3"):
        load_run_config(None, ["model.num_kv_heads=3"])


def test_model_from_a_hugging_face_config(tmp_path):
    mj.save_hf_config(mj.preset("tiny", sliding_window=8), str(tmp_path))
    cfg = load_run_config(None, [f"model.hf_config={tmp_path}", "model.dtype=bfloat16"])
    assert cfg.model == mj.preset("tiny", sliding_window=8, dtype="bfloat16")


def test_architecture_and_compute_are_separate_and_infer_takes_compute_overrides():
    cfg = mj.preset("tiny", dtype="bfloat16", moe_impl="dense")
    assert cfg.compute == mj.ComputeConfig(dtype="bfloat16", moe_impl="dense")
    assert "dtype" not in cfg.architecture and cfg.architecture["num_layers"] == 2
    assert mj.to_hf_dict(cfg)["dtype"] == "float32"  # the storage dtype, not how a run computes
    assert compute_overrides(["--model.dtype=bfloat16", "model.moe_impl=dense"]) == {
        "dtype": "bfloat16",
        "moe_impl": mj.MoEImpl.DENSE,
    }
    with pytest.raises(
        ConfigError, match="model.num_layers is architecture, fixed by the checkpoint's config.json"
    ):
        compute_overrides(["--model.num_layers=3"])
    with pytest.raises(ConfigError, match="ModelConfig.dtype='int8': must be one of"):
        compute_overrides(["--model.dtype=int8"])
    with pytest.raises(ConfigError, match="only model.<compute setting> is taken here"):
        compute_overrides(["--train.steps=3"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=1e39", "train.lr=1e+39: must be > 0 and finite in float32"),  # inf on device
        ("train.lr=inf", "train.lr=inf: must be > 0 and finite in float32"),
        ("train.lr=1e-50", "train.lr=1e-50: must be > 0 and finite in float32"),  # 0 on device
        ("train.eps=nan", "train.eps=nan: must be > 0"),
        ("train.clip_norm=1e39", "train.clip_norm=1e+39: must be > 0"),
        ("train.weight_decay=inf", "train.weight_decay=inf: must be >= 0 and finite"),
        ("train.lr=1e20 train.weight_decay=1e20", "train.weight_decay=1e+20: times train.lr=1e+20"),
        ("train.aux_loss_coef=1e39", "train.aux_loss_coef=1e+39: must be >= 0 and finite"),
        ("train.router_z_loss_coef=-1.0", "train.router_z_loss_coef=-1.0: must be >= 0"),
        ("train.b1=1.0", "train.b1=1.0: must be in [0, 1)"),
        ("train.b2=1.0", "train.b2=1.0: must be in (0, 1)"),
        (
            "model.rms_norm_eps=1e39",
            "ModelConfig.rms_norm_eps=1e+39: must be in [1.4e-45, 3.4e+38]",
        ),
        ("seed=-1", "seed=-1: must be in [0, 9223372036854775806]"),
        ("seed=9223372036854775807", "seed=9223372036854775807: must be in [0, "),
    ],
)
def test_settings_are_checked_as_the_device_and_the_prng_take_them(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, override.split())
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert load_run_config(None, ["seed=9223372036854775806"]).seed == 2**63 - 2


def test_resume_changes_name_what_changes_the_result():
    from mixtral_jax.train.config import resume_changes

    saved = to_dict(load_run_config(None))
    free = [
        "train.steps=900",
        "train.log_every=3",
        "checkpoint.keep=9",
        "checkpoint.dir=elsewhere",
        "mesh.data=2",
        "model.remat=full",
    ]
    assert resume_changes(saved, load_run_config(None, free)) == []
    changed = ["train.lr=0.01", "train.warmup_steps=3", "model.router_jitter_noise=0.1"]
    assert resume_changes(saved, load_run_config(None, changed)) == [
        ("model.compute.router_jitter_noise", 0.0, 0.1),
        ("train.lr", 0.003, 0.01),
        ("train.warmup_steps", 30, 3),
    ]
