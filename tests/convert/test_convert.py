"""Conversion end to end: every source layout gives transformers' logits; round trips are bit-exact.

One tiny random transformers Mixtral is written in each supported layout (transformers' own
save, the v5 fused layout, Mistral's consolidated format with the RoPE rows permuted back, the
Dec-2023 stacked format, a pickle), converted with the command line, loaded, and run.
"""

import json
import os

import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.convert import cli, layouts
from mixtral_jax.convert import safetensors_io as st
from mixtral_jax.convert.files import open_weights
from tests.hf_reference import legacy_state_dict, make_hf_model, torch, transformers

CFG = mj.ModelConfig.tiny(
    vocab_size=96,
    num_layers=2,
    embed_dim=32,
    hidden_dim=40,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_experts=3,
)
TOKENS = np.array([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 50]], np.int32)


def write_safetensors(path, tensors: dict) -> None:
    writer = st.StreamWriter(str(path), [(k, v.dtype, v.shape) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()


def mistral_dir(root, state: dict, cfg: mj.ModelConfig, stacked: bool):
    """A Mistral-format directory holding `state` (HF legacy keys, HF rotary convention)."""
    root.mkdir()
    out = {
        "tok_embeddings.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    moe = "block_sparse_moe" if stacked else "feed_forward"
    for i in range(cfg.num_layers):
        hf, ms = f"model.layers.{i}.", f"layers.{i}."
        out[ms + "attention_norm.weight"] = state[hf + "input_layernorm.weight"]
        out[ms + "ffn_norm.weight"] = state[hf + "post_attention_layernorm.weight"]
        out[ms + "attention.wq.weight"] = layouts.hf_to_mistral_rows(
            state[hf + "self_attn.q_proj.weight"], cfg.num_heads
        )
        out[ms + "attention.wk.weight"] = layouts.hf_to_mistral_rows(
            state[hf + "self_attn.k_proj.weight"], cfg.num_kv_heads
        )
        out[ms + "attention.wv.weight"] = state[hf + "self_attn.v_proj.weight"]
        out[ms + "attention.wo.weight"] = state[hf + "self_attn.o_proj.weight"]
        out[f"{ms}{moe}.gate.weight"] = state[hf + "block_sparse_moe.gate.weight"]
        experts = [f"{hf}block_sparse_moe.experts.{e}." for e in range(cfg.num_experts)]
        for w in ("w1", "w2", "w3"):
            if stacked:  # [E*F, D]; w2 stored per expert as [F, D]
                parts = [state[p + w + ".weight"] for p in experts]
                out[f"{ms}{moe}.{w}"] = np.ascontiguousarray(
                    np.concatenate([x.T if w == "w2" else x for x in parts])
                )
            else:
                for e, p in enumerate(experts):
                    out[f"{ms}{moe}.experts.{e}.{w}.weight"] = state[p + w + ".weight"]
    write_safetensors(root / "consolidated.safetensors", out)
    if stacked:
        params = {k: v for k, v in mj.to_hf_dict(cfg).items() if k not in ("architectures",)}
    else:
        params = {
            "dim": cfg.embed_dim,
            "n_layers": cfg.num_layers,
            "head_dim": cfg.head_dim,
            "hidden_dim": cfg.hidden_dim,
            "n_heads": cfg.num_heads,
            "n_kv_heads": cfg.num_kv_heads,
            "norm_eps": cfg.rms_norm_eps,
            "vocab_size": cfg.vocab_size,
            "rope_theta": cfg.rope_theta,
            "moe": {"num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok},
        }
    (root / "params.json").write_text(json.dumps(params))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model = make_hf_model(CFG, seed=3, std=0.2)
    state = legacy_state_dict(model)
    model.save_pretrained(str(root / "hf"))  # transformers' own on-disk layout
    model.save_pretrained(str(root / "hf-sharded"), max_shard_size="100KB")
    (root / "hf-fused").mkdir()
    fused = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    write_safetensors(root / "hf-fused" / "model.safetensors", fused)
    (root / "hf-fused" / "config.json").write_bytes((root / "hf" / "config.json").read_bytes())
    mistral_dir(root / "mistral", state, CFG, stacked=False)
    mistral_dir(root / "mistral-stacked", state, CFG, stacked=True)
    (root / "pickle").mkdir()
    torch.save(
        {k: torch.from_numpy(v) for k, v in state.items()},
        str(root / "pickle" / "pytorch_model.bin"),
    )
    (root / "pickle" / "config.json").write_bytes((root / "hf" / "config.json").read_bytes())
    with torch.no_grad():
        want = model(torch.from_numpy(TOKENS).long()).logits.numpy()
    return root, model, want


def our_logits(ckpt_dir) -> np.ndarray:
    cfg, params = checkpoint.load_model(str(ckpt_dir))
    model = mj.from_params(cfg, params)
    return np.asarray(model(TOKENS).logits)


@pytest.mark.parametrize(
    "layout", ["hf", "hf-sharded", "hf-fused", "mistral", "mistral-stacked", "pickle"]
)
def test_every_layout_gives_transformers_logits(sources, layout, capsys):
    root, _, want = sources
    extra = ["--allow-pickle"] if layout == "pickle" else []
    assert (
        cli.main(
            [
                "to-orbax",
                str(root / layout),
                str(root / f"out-{layout}"),
                "--quiet",
                "--check-finite",
                *extra,
            ]
        )
        == 0
    )
    expected = layout.removesuffix("-sharded").replace("pickle", "hf")
    assert f"(layout {expected}," in capsys.readouterr().out
    got = our_logits(root / f"out-{layout}")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mistral_rows_permutation_is_a_real_permutation():
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of H=8
    hf = layouts.mistral_to_hf_rows(w, 2)
    # Head 0: Mistral rows (0,1),(2,3),(4,5),(6,7) are pairs; HF puts evens first, then odds.
    assert hf[:8, 0].tolist() == [0, 6, 12, 18, 3, 9, 15, 21]
    np.testing.assert_array_equal(layouts.hf_to_mistral_rows(hf, 2), w)


def _tensors(directory) -> dict[str, np.ndarray]:
    problems = []
    weights = open_weights(str(directory), problems)
    assert not problems
    return {k: weights.read(k) for k in weights.keys()}  # noqa: SIM118 (no __iter__: not a dict)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact_and_transformers_loads_the_export(sources, tmp_path, dtype):
    _, model, want = sources
    src = tmp_path / "src"
    model.to(getattr(torch, dtype)).save_pretrained(str(src))
    model.float()
    assert cli.main(["to-orbax", str(src), str(tmp_path / "ours"), "--quiet"]) == 0
    assert mj.load_hf_config(str(tmp_path / "ours")).compute.param_dtype == dtype
    assert (
        cli.main(
            [
                "to-hf",
                str(tmp_path / "ours"),
                str(tmp_path / "back"),
                "--quiet",
                "--max-shard-gb",
                "0.00003",
            ]
        )
        == 0
    )  # ~32 KB shards: several files
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    a, b = _tensors(src), _tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert str(loaded.dtype) == f"torch.{dtype}"
    if dtype == "float32":
        with torch.no_grad():
            got = loaded(torch.from_numpy(TOKENS).long()).logits.numpy()
        # Same weights bit for bit; transformers' default attention kernel differs from the
        # eager oracle's in the last float32 bits.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_inspect_describes_without_writing(sources, tmp_path, capsys):
    root, _, _ = sources
    before = sorted(os.listdir(root))
    assert cli.main(["inspect", str(root / "hf-fused")]) == 0
    assert "layout hf-fused" in capsys.readouterr().out
    assert sorted(os.listdir(root)) == before
    assert cli.main(["to-orbax", str(root / "hf"), str(tmp_path / "ours"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert f"model checkpoint, {CFG.param_count:,} parameters" in out
    assert f"L={CFG.num_layers} D={CFG.embed_dim}" in out
    assert sorted(os.listdir(tmp_path)) == ["ours"]


def test_round_trip_keeps_every_config_field_transformers_reads(sources, tmp_path):
    """Fields we do not read (output_router_logits, attention_dropout, use_cache, ...) pass
    through our checkpoint: the exported config.json is read by transformers as the source's."""
    _, model, _ = sources
    src = tmp_path / "src"
    model.config.output_router_logits = True
    model.config.attention_dropout = 0.125
    model.config.use_cache = False
    model.config.router_aux_loss_coef = 0.03
    try:
        model.save_pretrained(str(src))
    finally:
        model.config.output_router_logits = False
        model.config.attention_dropout = 0.0
        model.config.use_cache = True
    assert cli.main(["to-orbax", str(src), str(tmp_path / "ours"), "--quiet"]) == 0
    assert cli.main(["to-hf", str(tmp_path / "ours"), str(tmp_path / "back"), "--quiet"]) == 0
    before = transformers.AutoConfig.from_pretrained(str(src)).to_dict()
    after = transformers.AutoConfig.from_pretrained(str(tmp_path / "back")).to_dict()
    for key in ("_name_or_path", "transformers_version"):
        before.pop(key, None), after.pop(key, None)
    assert {k: v for k, v in after.items() if before.get(k) != v} == {}
    assert {k: v for k, v in before.items() if after.get(k) != v} == {}
    assert after["output_router_logits"] is True and after["use_cache"] is False


def _mistral_with(tmp_path, sources, **changes):
    """A copy of the Mistral fixture directory whose params.json has `changes` (None deletes)."""
    import shutil

    root, _, _ = sources
    out = tmp_path / "mistral"
    shutil.copytree(root / "mistral", out)
    params = json.loads((out / "params.json").read_text())
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    (out / "params.json").write_text(json.dumps(params))
    return str(out)


def test_mistral_params_json_is_read_strictly(sources, tmp_path):
    from mixtral_jax.config import ConfigError
    from mixtral_jax.convert import open_source

    for changes, message in [
        ({"norm_eps": None}, "lacks 'norm_eps'"),
        ({"rope_scaling": 2.0}, "unknown key 'rope_scaling'"),
        ({"moe": {"num_experts": 3, "num_experts_per_tok": 2, "router": 1}}, "'moe.router'"),
        ({"sliding_window": 8, "_sliding_window": 16}, "disagree"),
    ]:
        with pytest.raises(ConfigError) as e:
            open_source(_mistral_with(tmp_path / str(len(message)), sources, **changes))
        assert message in str(e.value), (changes, str(e.value))
    for key in ("sliding_window", "_sliding_window"):
        src = open_source(_mistral_with(tmp_path / key, sources, **{key: 8}))
        assert src.cfg.sliding_window == 8, key
    src = open_source(_mistral_with(tmp_path / "eps", sources, norm_eps=1e-6))
    assert src.cfg.rms_norm_eps == 1e-6
