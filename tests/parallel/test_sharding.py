"""Sharded model on 8 fake CPU devices equals the single-device model; shardings follow the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax.parallel import sharding as sh

MESHES = ["data=8", "expert=4,data=2", "fsdp=4,tensor=2", "data=2,fsdp=2,expert=2"]


def _loss(cfg, params, tokens):
    out = mj.from_params(cfg, params)(tokens)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll) + cfg.router_aux_loss_coef * out.aux.load_balance_loss, out.logits


@pytest.fixture(scope="module")
def reference():
    cfg = mj.ModelConfig.tiny()
    params = mj.get_params(mj.init(cfg, seed=3))
    tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, cfg.vocab_size)
    one = jax.devices()[:1]
    params1, tokens1 = jax.device_put((params, tokens), one[0])
    (_, logits), grads = jax.jit(jax.value_and_grad(lambda p, t: _loss(cfg, p, t), has_aux=True))(
        params1, tokens1
    )
    return cfg, params, tokens, logits, grads


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_and_grads_equal_single_device(reference, spec):
    cfg, params, tokens, logits_ref, grads_ref = reference
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec))
    sharded = mj.init_params(cfg, mesh, seed=3)
    # created sharded, with model.init's values, and every leaf placed per the rules table
    expected = sh.param_shardings(mj.param_shapes(cfg), mesh)
    for (path, leaf), want, ref in zip(
        jax.tree_util.tree_leaves_with_path(sharded),
        jax.tree_util.tree_leaves(expected),
        jax.tree_util.tree_leaves(params),
    ):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), name
        # jit-compiled init may fuse the scale multiply: equal to a float32 ulp
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-6, err_msg=name)
    toks = jax.device_put(tokens, sh.batch_sharding(mesh))
    step = jax.jit(
        jax.value_and_grad(lambda p, t: _loss(cfg, p, t), has_aux=True),
        out_shardings=((None, None), expected),
    )
    (_, logits), grads = step(sharded, toks)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), rtol=1e-5, atol=1e-5)
    for (path, g), g_ref in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads_ref)
    ):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        scale = float(np.max(np.abs(np.asarray(g_ref)))) + 1e-12
        np.testing.assert_allclose(
            np.asarray(g) / scale, np.asarray(g_ref) / scale, atol=1e-5, err_msg=name
        )


def test_rules_table_specs():
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,tensor=2"))
    shardings = sh.param_shardings(mj.param_shapes(mj.ModelConfig.tiny()), mesh)
    specs = jax.tree_util.tree_map(lambda s: s.spec, shardings)
    assert specs["layers"]["moe"]["w_gate"] == jax.sharding.PartitionSpec(
        None, "expert", None, "tensor"
    )
    assert specs["layers"]["attn"]["o_proj"] == jax.sharding.PartitionSpec(
        None, "tensor", None, None
    )
    assert specs["lm_head"] == jax.sharding.PartitionSpec(None, "tensor")


@pytest.mark.parametrize(
    "text, message",
    [
        ("data=3", "uses 3 devices, but 8 are present"),
        ("data=-1,expert=-1", "at most one may be"),
        ("pipeline=2", "expected one of data, fsdp, expert, tensor"),
        ("data=x", "size must be an integer"),
        ("expert=3,data=-1", "does not divide"),
    ],
)
def test_bad_mesh_is_one_line_error(text, message):
    with pytest.raises(ValueError, match=message):
        sh.MeshConfig.parse(text).resolve(len(jax.devices()))


@pytest.mark.parametrize("spec", ["expert=4,data=2", "data=2,fsdp=2,expert=2"])
def test_expert_parallel_model_equals_single_device(reference, spec):
    """The whole model with MoE layers dispatching by all-to-all (sharding.active)."""
    cfg, params, tokens, logits_ref, grads_ref = reference
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec))
    sharded = sh.shard_params(params, mesh)
    toks = jax.device_put(tokens, sh.batch_sharding(mesh))
    with sh.active(mesh):
        step = jax.jit(jax.value_and_grad(lambda p, t: _loss(cfg, p, t), has_aux=True))
        assert "all-to-all" in step.lower(sharded, toks).as_text(dialect="hlo")
        (_, logits), grads = step(sharded, toks)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_ref), rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        scale = float(np.max(np.abs(np.asarray(g_ref)))) + 1e-12
        np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(g_ref) / scale, atol=1e-5)


def test_activations_follow_the_active_mesh():
    """Inside sharding.active, the model's activations are constrained to the rules table
    (logits split by batch over data and by vocab over tensor); outside it they are not."""
    cfg = mj.ModelConfig.tiny()
    mesh = sh.make_mesh(sh.MeshConfig.parse("data=4,tensor=2"))
    params = mj.init_params(cfg, mesh, seed=0)
    tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32), sh.batch_sharding(mesh))
    forward = lambda p, t: mj.from_params(cfg, p)(t).logits
    with sh.active(mesh):
        logits = jax.jit(forward)(params, tokens)
    want = sh.logical_spec(mesh, logits.shape, ("batch", "length", "vocab"))
    assert want == jax.sharding.PartitionSpec("data", None, "tensor")
    assert logits.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), 3)
    # Fresh functions: jit caches traces per function, and the context is read at trace time.
    hlo = jax.jit(lambda p, t: forward(p, t)).lower(params, tokens).as_text()
    with sh.active(mesh):
        constrained = jax.jit(lambda p, t: forward(p, t)).lower(params, tokens).as_text()
    marker = "sharding_constraint"  # sdy.sharding_constraint (Shardy) or @Sharding (GSPMD)
    if marker not in constrained:
        marker = "@Sharding"
    assert constrained.count(marker) > hlo.count(marker)
    assert sh.active_mesh() is None


def _count(jaxpr, name: str) -> int:
    """Equations of primitive `name` in a jaxpr and every jaxpr nested in it (scan, jit, remat)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _count(sub, name)
    return n


def test_key_activations_are_pinned_only_on_a_mesh():
    """Embeddings, logits and, in the (scanned) block, attention in/out, MoE in/out and the
    block output carry a sharding constraint on the active mesh; none without a mesh."""
    cfg = mj.ModelConfig.tiny(num_layers=1)
    params = mj.get_params(mj.init(cfg, 0))
    tokens = jnp.zeros((8, 16), jnp.int32)

    def constraints():  # a fresh function each time: traces are cached per function
        jaxpr = jax.make_jaxpr(lambda p, t: mj.from_params(cfg, p)(t).logits)(params, tokens)
        return _count(jaxpr.jaxpr, "sharding_constraint")

    assert constraints() == 0
    with sh.active(sh.make_mesh(sh.MeshConfig.parse("data=4,tensor=2"))):
        assert constraints() >= 2 + 5
