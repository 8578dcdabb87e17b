"""ModelConfig: presets, validation messages, Hugging Face config.json mapping."""

import json

import pytest

import mixtral_jax as mj
from mixtral_jax.config import ConfigError


def test_presets_have_published_sizes():
    big = mj.preset("mixtral-8x7b")
    assert big.param_count == 46_702_792_704
    assert big.active_param_count == 12_879_925_248
    huge = mj.preset("mixtral-8x22b")
    assert huge.param_count == 140_630_071_296  # published as "141B total"
    assert round(huge.param_count / 1e9) == 141
    assert round(huge.active_param_count / 1e9) == 39  # published as "39B active"
    assert mj.preset("tiny").num_groups == 2


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"num_heads": 6, "num_kv_heads": 4},
            "ModelConfig.num_heads=6: must be divisible by num_kv_heads=4",
        ),
        (
            {"num_experts_per_tok": 5, "num_experts": 4},
            "ModelConfig.num_experts_per_tok=5: must be <= num_experts=4",
        ),
        ({"embed_dim": -8}, "ModelConfig.embed_dim=-8: must be >= 1"),
        ({"num_layers": 0}, "ModelConfig.num_layers=0: must be >= 1"),
        ({"hidden_dim": 2.5}, "ModelConfig.hidden_dim=2.5: must be an integer"),
        ({"head_dim": 15}, "ModelConfig.head_dim=15: must be even"),
        ({"sliding_window": 0}, "ModelConfig.sliding_window=0: must be >= 1"),
        ({"rope_theta": -1.0}, "ModelConfig.rope_theta=-1.0: must be a finite number > 0"),
        (
            {"rms_norm_eps": float("nan")},
            "ModelConfig.rms_norm_eps=nan: must be a finite number > 0",
        ),
        ({"router_jitter_noise": 1.5}, "ModelConfig.router_jitter_noise=1.5: must be in [0, 1)"),
        ({"dtype": "int8"}, "ModelConfig.dtype='int8': must be one of float32, bfloat16, float16"),
        (
            {"moe_impl": "magic"},
            "ModelConfig.moe_impl='magic': must be one of dense, dropless, capacity",
        ),
        (
            {"layer_loop": "sideways"},
            "ModelConfig.layer_loop='sideways': must be one of scan, unrolled",
        ),
        (
            {"eos_token_id": 600},
            "ModelConfig.eos_token_id=600: must be an integer in [0, vocab_size=512)",
        ),
    ],
)
def test_bad_values_give_one_line_errors_naming_field_value_and_rule(changes, message):
    with pytest.raises(ConfigError) as err:
        mj.ModelConfig.tiny(**changes)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_field_and_preset_are_errors():
    with pytest.raises(ConfigError, match="no field 'num_expert'"):
        mj.ModelConfig.tiny(num_expert=3)
    with pytest.raises(ConfigError, match="unknown model preset 'mixtral-7x8b'"):
        mj.preset("mixtral-7x8b")


def test_strings_become_enums():
    cfg = mj.ModelConfig.tiny(moe_impl="capacity", remat="save_dots")
    assert cfg.compute.moe_impl is mj.MoEImpl.CAPACITY and cfg.compute.remat is mj.Remat.SAVE_DOTS


def test_capacity_rounds_up():
    cfg = mj.ModelConfig.tiny(capacity_factor=1.25)  # 4 experts, top-2
    assert cfg.capacity(10) == 7  # ceil(1.25 * 10 * 2 / 4) = ceil(6.25)


@pytest.mark.parametrize("rope_format", ["v4", "v5"])
def test_hf_config_round_trip(rope_format, tmp_path):
    cfg = mj.preset("mixtral-8x7b", sliding_window=4096, param_dtype="bfloat16")
    hf = mj.to_hf_dict(cfg, rope_format=rope_format)
    assert hf["hidden_size"] == 4096 and hf["num_local_experts"] == 8
    assert ("rope_theta" in hf) == (rope_format == "v4")
    assert ("rope_parameters" in hf) == (rope_format == "v5")
    assert mj.from_hf_dict(hf) == cfg
    mj.save_hf_config(cfg, str(tmp_path), rope_format=rope_format)
    assert mj.load_hf_config(str(tmp_path)) == cfg


def test_reads_the_published_8x7b_config_json():
    published = {  # mistralai/Mixtral-8x7B-v0.1 config.json (transformers v4 form)
        "architectures": ["MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mixtral",
        "num_attention_heads": 32,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1e6,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    }
    assert mj.from_hf_dict(published) == mj.preset("mixtral-8x7b", param_dtype="bfloat16")


@pytest.mark.parametrize(
    "hf_change,message",
    [
        ({"model_type": "llama"}, "model_type='llama'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope_type='yarn'"),
        (
            {"num_attention_heads": 7},
            "ModelConfig.num_heads=7: must be divisible by num_kv_heads=8",
        ),
    ],
)
def test_unsupported_hf_configs_are_refused(hf_change, message):
    hf = mj.to_hf_dict(mj.preset("mixtral-8x7b"))
    hf.update(hf_change)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        mj.from_hf_dict(hf)


def test_load_hf_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no config.json at"):
        mj.load_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        mj.load_hf_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ConfigError, match="lacks 'vocab_size'"):
        mj.load_hf_config(str(tmp_path))
