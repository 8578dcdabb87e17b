"""Expert surgery: drop / merge / top-k give valid smaller models with the expected function."""

import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint, surgery
from mixtral_jax.config import ConfigError


def _np_params(model):
    return {k: _np_tree(v) for k, v in mj.get_params(model).items()}


def _np_tree(x):
    return {k: _np_tree(v) for k, v in x.items()} if isinstance(x, dict) else np.array(x)


def _tokens(cfg, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11)))


def test_dropping_no_expert_is_bit_exact():
    cfg = mj.ModelConfig.tiny()
    model = mj.init(cfg, 0)
    params = _np_params(model)
    new_params, new_cfg = surgery.drop_experts(params, cfg, [])
    assert new_cfg == cfg
    for path in ("w_gate", "w_up", "w_down", "router"):
        np.testing.assert_array_equal(
            new_params["layers"]["moe"][path], params["layers"]["moe"][path]
        )
    again = mj.from_params(new_cfg, new_params)
    np.testing.assert_array_equal(again(_tokens(cfg)).logits, model(_tokens(cfg)).logits)


def test_dropped_checkpoint_equals_a_directly_built_smaller_model(tmp_path):
    small_cfg = mj.ModelConfig.tiny(num_experts=3)
    small = mj.init(small_cfg, 5)
    small_params = _np_params(small)
    # Embed the small model in a 4-expert model: a random extra expert (and router column) at 1.
    big_cfg = small_cfg.replace(num_experts=4)
    big_params = _np_params(mj.init(big_cfg, 6))
    order = [0, 2, 3]  # where the small model's experts sit in the big one
    for name in ("w_gate", "w_up", "w_down"):
        big_params["layers"]["moe"][name][:, order] = small_params["layers"]["moe"][name]
    big_params["layers"]["moe"]["router"][:, :, order] = small_params["layers"]["moe"]["router"]
    for key in ("embed", "final_norm", "lm_head"):
        big_params[key] = small_params[key]
    for key in ("attn", "attn_norm", "moe_norm"):
        big_params["layers"][key] = small_params["layers"][key]

    cut_params, cut_cfg = surgery.drop_experts(big_params, big_cfg, [1])
    assert cut_cfg == small_cfg
    checkpoint.save_model(str(tmp_path / "cut"), cut_params, cut_cfg)
    loaded_cfg, loaded = checkpoint.load_model(str(tmp_path / "cut"))
    assert loaded_cfg.num_experts == 3
    model = mj.from_params(loaded_cfg, loaded)
    tokens = _tokens(small_cfg)
    np.testing.assert_array_equal(model(tokens).logits, small(tokens).logits)


def test_per_layer_drop_and_least_used():
    cfg = mj.ModelConfig.tiny(num_experts=5)
    params = _np_params(mj.init(cfg, 0))
    new_params, new_cfg = surgery.drop_experts(params, cfg, [[0, 4], [2, 3]])
    assert new_cfg.num_experts == 3
    w = params["layers"]["moe"]["w_down"]
    np.testing.assert_array_equal(new_params["layers"]["moe"]["w_down"][0], w[0, [1, 2, 3]])
    np.testing.assert_array_equal(new_params["layers"]["moe"]["w_down"][1], w[1, [0, 1, 4]])
    np.testing.assert_array_equal(
        new_params["layers"]["moe"]["router"][1], params["layers"]["moe"]["router"][1][:, [0, 1, 4]]
    )
    share = np.array([[0.3, 0.05, 0.3, 0.3, 0.05], [0.1, 0.2, 0.3, 0.0, 0.4]])
    assert surgery.least_used(share, 2) == [[1, 4], [0, 3]]


@pytest.mark.parametrize(
    "drop,message",
    [
        ([7], "expert 7 out of range [0, 4)"),
        ([1, 1], "repeats an expert"),
        ([[0], [0, 1]], "same number of experts"),
        ([0, 1, 2], "1 experts left < top-k 2"),
        ([[0]], "drop lists for 1 layers, model has 2"),
    ],
)
def test_bad_drops_are_refused(drop, message):
    cfg = mj.ModelConfig.tiny()
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        surgery.drop_experts(_np_params(mj.init(cfg, 0)), cfg, drop)


def test_merge_is_the_weighted_average_and_keeps_the_rest():
    cfg = mj.ModelConfig.tiny(num_experts=4)
    params = _np_params(mj.init(cfg, 0))
    weights = [0.1, 0.2, 0.3, 0.4]
    merged, merged_cfg = surgery.merge_experts(params, cfg, [[1, 3]], weights)
    assert merged_cfg.num_experts == 3  # groups ordered by smallest member: [0], [1, 3], [2]
    w = params["layers"]["moe"]["w_gate"]
    np.testing.assert_allclose(
        merged["layers"]["moe"]["w_gate"][:, 1],
        (0.2 * w[:, 1] + 0.4 * w[:, 3]) / 0.6,
        rtol=1e-6,
        atol=1e-8,
    )
    np.testing.assert_array_equal(merged["layers"]["moe"]["w_gate"][:, 0], w[:, 0])
    np.testing.assert_array_equal(merged["layers"]["moe"]["w_gate"][:, 2], w[:, 2])
    r = params["layers"]["moe"]["router"]
    np.testing.assert_allclose(
        merged["layers"]["moe"]["router"][:, :, 1],
        (0.2 * r[:, :, 1] + 0.4 * r[:, :, 3]) / 0.6,
        rtol=1e-6,
        atol=1e-8,
    )
    model = mj.from_params(merged_cfg, merged)
    assert bool(jnp.all(jnp.isfinite(model(_tokens(cfg)).logits)))
    with pytest.raises(ConfigError, match="appears in two merge groups"):
        surgery.merge_experts(params, cfg, [[0, 1], [1, 2]])
    with pytest.raises(ConfigError, match="2 experts left < top-k"):
        surgery.merge_experts(params, cfg.replace(num_experts_per_tok=3), [[0, 1], [2, 3]])


def test_merge_of_singleton_groups_is_the_identity():
    cfg = mj.ModelConfig.tiny(num_experts=3)
    params = _np_params(mj.init(cfg, 0))
    merged, merged_cfg = surgery.merge_experts(params, cfg, [[0], [1], [2]])
    assert merged_cfg == cfg
    for name in ("w_gate", "w_up", "w_down", "router"):
        np.testing.assert_array_equal(merged["layers"]["moe"][name], params["layers"]["moe"][name])


def test_lower_topk_model_equals_a_directly_built_one_and_validates():
    """A top-2 model's weights under set_topk(cfg, 1) give the logits of a model built with
    top-1 from the same seed (and not the top-2 model's logits)."""
    cfg = mj.ModelConfig.tiny()
    assert cfg.num_experts_per_tok == 2
    top2 = mj.init(cfg, 0)
    top1_cfg = surgery.set_topk(cfg, 1)
    assert top1_cfg.num_experts_per_tok == 1
    changed = mj.from_params(top1_cfg, _np_params(top2))
    direct = mj.init(mj.ModelConfig.tiny(num_experts_per_tok=1), 0)
    tokens = _tokens(cfg)
    np.testing.assert_array_equal(changed(tokens).logits, direct(tokens).logits)
    assert not np.allclose(changed(tokens).logits, top2(tokens).logits, atol=1e-4)
    with pytest.raises(ConfigError, match="must be <= num_experts=4"):
        surgery.set_topk(cfg, 5)
