"""Expert swapping and LoRA merging through `python -m mixtral_jax.surgery`: a swap of an expert
with itself is bit-exact, a swap equals a model built directly with the donor's weights, a
dense donor's MLP lands transposed as upcycling puts it, a merge equals base + A B * alpha / r."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint
from mixtral_jax.checkpoint.adapters import save_adapters
from mixtral_jax.config import ConfigError
from mixtral_jax.model import lora
from mixtral_jax.surgery import cli, swap

CFG = mj.ModelConfig.tiny(num_layers=2)


def _save(tmp_path, name, seed, cfg=CFG):
    params = jax.device_get(mj.get_params(mj.init(cfg, seed)))
    checkpoint.save_model(str(tmp_path / name), params, cfg)
    return params


def _loaded(path):
    return checkpoint.to_numpy(checkpoint.load_model(str(path))[1])


def test_swapping_an_expert_with_itself_is_bit_exact(tmp_path):
    params = _save(tmp_path, "a", 0)
    a = str(tmp_path / "a")
    argv = ["swap", "--checkpoint", a, "--donor", a, "--expert", "2", "--out"]
    assert cli.main([*argv, str(tmp_path / "c")]) == 0
    jax.tree.map(np.testing.assert_array_equal, _loaded(tmp_path / "c"), params)


def test_a_swap_equals_a_model_built_with_the_donors_weights(tmp_path):
    params, donor = _save(tmp_path, "a", 0), _save(tmp_path, "b", 1)
    argv = ["swap", "--checkpoint", str(tmp_path / "a"), "--donor", str(tmp_path / "b")]
    argv += ["--expert", "3", "--donor-expert", "0", "--layer", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "c")]) == 0
    direct = jax.tree.map(np.array, params)
    for name in ("w_gate", "w_up", "w_down"):
        direct["layers"]["moe"][name][1, 3] = donor["layers"]["moe"][name][1, 0]
    swapped = _loaded(tmp_path / "c")
    jax.tree.map(np.testing.assert_array_equal, swapped, direct)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7)))
    np.testing.assert_array_equal(
        mj.from_params(CFG, swapped)(tokens).logits, mj.from_params(CFG, direct)(tokens).logits
    )
    assert not np.array_equal(swapped["layers"]["moe"]["w_up"], params["layers"]["moe"]["w_up"])


def test_a_dense_donor_mlp_becomes_the_expert_in_every_layer():
    rng = np.random.default_rng(0)
    d, f = CFG.embed_dim, CFG.hidden_dim
    state = {}
    for i in range(CFG.num_layers):  # Hugging Face layout: [out, in]
        state[f"model.layers.{i}.mlp.gate_proj.weight"] = rng.standard_normal((f, d), np.float32)
        state[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal((f, d), np.float32)
        state[f"model.layers.{i}.mlp.down_proj.weight"] = rng.standard_normal((d, f), np.float32)
    dense_cfg = {"num_hidden_layers": CFG.num_layers, "hidden_size": d, "intermediate_size": f}
    donor, dims = swap.donor_from_dense(state.__getitem__, dense_cfg)
    params = jax.device_get(mj.get_params(mj.init(CFG, 0)))
    out = swap.swap_expert(params, CFG, donor, dims, None, 1)
    for i in range(CFG.num_layers):
        moe = out["layers"]["moe"]
        np.testing.assert_array_equal(
            moe["w_gate"][i, 1], state[f"model.layers.{i}.mlp.gate_proj.weight"].T
        )
        np.testing.assert_array_equal(
            moe["w_down"][i, 1], state[f"model.layers.{i}.mlp.down_proj.weight"].T
        )
        np.testing.assert_array_equal(moe["w_up"][i, 0], params["layers"]["moe"]["w_up"][i, 0])


def test_swap_errors_are_one_line(tmp_path, capsys):
    _save(tmp_path, "a", 0)
    _save(tmp_path, "wide", 1, CFG.replace(hidden_dim=80))
    argv = ["swap", "--checkpoint", str(tmp_path / "a"), "--donor", str(tmp_path / "wide")]
    assert cli.main([*argv, "--expert", "0", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert "donor widths embed_dim=64, hidden_dim=80 differ" in err and err.count("\n") == 1
    donor, dims = swap.donor_from_model(_loaded(tmp_path / "a"), CFG, 0)
    with pytest.raises(ConfigError, match=r"--expert 4: out of range \[0, 4\)"):
        swap.swap_expert(_loaded(tmp_path / "a"), CFG, donor, dims, None, 4)


def test_merge_lora_writes_base_plus_adapters(tmp_path):
    params = _save(tmp_path, "base", 0)
    lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("v_proj", "w_up", "router"))
    adapters = lora.init_adapters(CFG, lcfg, seed=1)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = jax.tree.unflatten(
        tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )
    adapters = jax.device_get(adapters)
    save_adapters(str(tmp_path / "ad"), adapters, lcfg)
    argv = [
        "merge-lora",
        "--checkpoint",
        str(tmp_path / "base"),
        "--adapters",
        str(tmp_path / "ad"),
    ]
    assert cli.main([*argv, "--out", str(tmp_path / "merged")]) == 0
    merged = _loaded(tmp_path / "merged")
    a = np.asarray(adapters["layers"]["moe"]["lora_w_up_a"], np.float64)  # [L, E, D, r]
    b = np.asarray(adapters["layers"]["moe"]["lora_w_up_b"], np.float64)  # [L, E, r, F]
    want = params["layers"]["moe"]["w_up"] + 2.0 * np.einsum("LEDr,LErF->LEDF", a, b)
    np.testing.assert_allclose(merged["layers"]["moe"]["w_up"], want, rtol=0, atol=1e-6)
    a = np.asarray(adapters["layers"]["moe"]["lora_router_a"], np.float64)  # [L, D, r]
    b = np.asarray(adapters["layers"]["moe"]["lora_router_b"], np.float64)  # [L, r, E]
    want = params["layers"]["moe"]["router"] + 2.0 * np.einsum("LDr,LrE->LDE", a, b)
    np.testing.assert_allclose(merged["layers"]["moe"]["router"], want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(
        merged["layers"]["attn"]["q_proj"], params["layers"]["attn"]["q_proj"]
    )
