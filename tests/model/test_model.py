"""The whole model: abstract shapes of the real presets, scan, remat, dtypes, packing, params API."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj


def _count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_abstract_8x7b_allocates_nothing_and_counts_exactly():
    gc.collect()  # arrays earlier tests dropped would otherwise vanish during the count
    before = len(jax.live_arrays())
    cfg = mj.preset("mixtral-8x7b")
    model = mj.abstract(cfg)
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert len(jax.live_arrays()) == before
    assert _count(model) == 46_702_792_704 == cfg.param_count
    assert cfg.active_param_count == 12_879_925_248
    params = mj.get_params(model)
    assert params["layers"]["moe"]["w_gate"].shape == (32, 8, 4096, 14336)
    assert params["layers"]["attn"]["k_proj"].shape == (32, 4096, 8, 128)
    assert params["lm_head"].shape == (4096, 32000)


def test_abstract_8x22b_counts_exactly():
    cfg = mj.preset("mixtral-8x22b")
    assert _count(mj.abstract(cfg)) == cfg.param_count == 140_630_071_296


def _grads(cfg, params, tokens, mask=None):
    model = mj.init(cfg, 0)
    mj.set_params(model, params)
    graphdef, state = nnx.split(model)

    def loss(state):
        out = nnx.merge(graphdef, state)(tokens, mask)
        return jnp.mean(out.logits**2) + out.aux.load_balance_loss + out.aux.router_z_loss, out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return out, grads


def _assert_trees_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        scale = float(jnp.max(jnp.abs(y)))
        assert float(jnp.max(jnp.abs(x - y))) <= rtol * max(scale, 1e-30)


@pytest.mark.parametrize(
    "changes",
    [
        {"moe_impl": "dropless"},
        {"moe_impl": "capacity", "capacity_factor": 4.0},
        {"moe_impl": "dropless", "remat": "full"},
        {"moe_impl": "dropless", "remat": "save_dots"},
        {"moe_impl": "dropless", "layer_loop": "unrolled"},
        {"moe_impl": "dropless", "layer_loop": "unrolled", "remat": "full"},
    ],
    ids=["dropless", "capacity", "remat-full", "remat-save-dots", "unrolled", "unrolled-remat"],
)
def test_whole_model_paths_equal_dense_oracle_on_logits_and_gradients(changes):
    cfg = mj.ModelConfig.tiny(num_layers=3, sliding_window=6)
    params = mj.get_params(mj.init(cfg, 1))
    params["layers"]["moe"]["router"] = params["layers"]["moe"]["router"] * 20.0  # decisive routing
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, cfg.vocab_size)
    mask = jnp.ones((2, 13), jnp.int32).at[1, :4].set(0)
    ref_out, ref_grads = _grads(cfg.replace(moe_impl="dense"), params, tokens, mask)
    out, grads = _grads(cfg.replace(**changes), params, tokens, mask)
    _assert_trees_close(out.logits, ref_out.logits, 1e-5)
    _assert_trees_close(grads, ref_grads, 1e-5)


def test_layers_are_scanned_not_unrolled():
    """One compiled layer: the jaxpr holds a single scan of length L with one layer's matmuls."""
    cfg = mj.ModelConfig.tiny(num_layers=5)
    model = mj.init(cfg, 0)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).logits)(
        state, jnp.zeros((1, 4), jnp.int32)
    )
    text = str(jaxpr)
    assert text.count("scan[") == 1 and "length=5" in text
    assert text.count("ragged_dot_general[") == 3  # gate, up, down of ONE layer body


def test_unrolled_layers_hold_no_loop():
    """layer_loop="unrolled": L copies of the layer's matmuls and no scan in the jaxpr (its
    logits and gradients: the dense-oracle test above)."""
    cfg = mj.ModelConfig.tiny(num_layers=3, moe_impl="dropless", layer_loop="unrolled")
    graphdef, state = nnx.split(mj.init(cfg, 0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    text = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).logits)(state, tokens))
    assert "scan[" not in text and text.count("ragged_dot_general[") == 3 * 3
    # router jitter: layer i draws from the same split of the noise key as the scan's layer i
    jitter = {"router_jitter_noise": 0.1}
    tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, cfg.vocab_size)
    outs = [
        mj.init(cfg.replace(layer_loop=loop, **jitter), 0)(tokens, noise_rng=jax.random.key(3))
        for loop in ("scan", "unrolled")
    ]
    _assert_trees_close(outs[1].logits, outs[0].logits, 1e-6)


def test_bfloat16_compute_and_storage():
    cfg = mj.ModelConfig.tiny()
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    ref = mj.init(cfg, 0)(tokens).logits
    mixed = mj.init(cfg.replace(dtype="bfloat16"), 0)  # float32 master weights, bf16 compute
    assert mixed.layers.moe.w_gate[...].dtype == jnp.float32
    out = mixed(tokens)
    assert out.logits.dtype == jnp.float32 and out.aux.layers.router_logits.dtype == jnp.float32
    rel = float(jnp.max(jnp.abs(out.logits - ref)) / jnp.max(jnp.abs(ref)))
    assert 0 < rel < 5e-2
    stored = mj.init(cfg.replace(dtype="bfloat16", param_dtype="bfloat16"), 0)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(mj.get_params(stored)))
    assert bool(jnp.all(jnp.isfinite(stored(tokens).logits)))


def test_packed_documents_equal_separate_runs():
    """segment_ids + per-document positions make a packed row equal to each document alone."""
    cfg = mj.ModelConfig.tiny(moe_impl="dense")
    model = mj.init(cfg, 0)
    doc_a = jax.random.randint(jax.random.key(1), (1, 5), 0, cfg.vocab_size)
    doc_b = jax.random.randint(jax.random.key(2), (1, 7), 0, cfg.vocab_size)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segments = jnp.array([[0] * 5 + [1] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    out = model(packed, segment_ids=segments, positions=positions).logits
    np.testing.assert_allclose(out[:, :5], model(doc_a).logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], model(doc_b).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", ["set_params", "from_params"])
def test_set_params_names_missing_and_misshapen_leaves(build):
    cfg = mj.ModelConfig.tiny()
    model = mj.init(cfg, 0)
    load = (
        (lambda p: mj.set_params(model, p))
        if build == "set_params"
        else (lambda p: mj.from_params(cfg, p))
    )
    params = mj.get_params(model)
    del params["layers"]["moe"]["w_up"]
    with pytest.raises(ValueError, match="parameter layers.moe.w_up missing"):
        load(params)
    params = mj.get_params(model)
    params["lm_head"] = jnp.zeros((3, 3))
    with pytest.raises(
        ValueError, match=r"parameter lm_head has shape \(3, 3\), expected \(64, 512\)"
    ):
        load(params)
    params = mj.get_params(model)
    params["extra"] = jnp.zeros(2)
    with pytest.raises(ValueError, match="unexpected parameter extra"):
        load(params)


def test_from_params_casts_and_equals_set_params_in_and_out_of_jit():
    """from_params gives set_params's model (leaves cast to param_dtype), also inside jit."""
    cfg = mj.ModelConfig.tiny(num_layers=2)
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), mj.get_params(mj.init(cfg, 4)))
    model = mj.init(cfg, 0)
    mj.set_params(model, params)
    built = mj.from_params(cfg, params)
    assert {x.dtype for x in jax.tree.leaves(mj.get_params(built))} == {
        jnp.dtype(cfg.compute.param_dtype)
    }
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    want = model(tokens).logits
    np.testing.assert_array_equal(built(tokens).logits, want)
    jitted = jax.jit(lambda p, t: mj.from_params(cfg, p)(t).logits)
    np.testing.assert_allclose(jitted(mj.get_params(model), tokens), want, rtol=1e-6, atol=1e-6)


def test_init_is_deterministic_per_seed_and_layers_differ():
    cfg = mj.ModelConfig.tiny()
    a, b, c = (
        mj.get_params(mj.init(cfg, 3)),
        mj.get_params(mj.init(cfg, 3)),
        mj.get_params(mj.init(cfg, 4)),
    )
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["lm_head"], c["lm_head"])
    w = a["layers"]["moe"]["w_gate"]
    assert not np.array_equal(w[0], w[1]) and not np.array_equal(w[0, 0], w[0, 1])
    assert float(jnp.std(w)) == pytest.approx(cfg.initializer_range, rel=0.05)
