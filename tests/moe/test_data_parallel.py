"""The Pallas / megablox dropless MoE on a mesh without an expert axis runs per device
(moe/data_parallel.py): the MoE layer equals the one-device dense oracle (forward, gradients,
aux), with LoRA adapters and quantized experts too, and its compiled program gathers no tokens.
The kernels run in Pallas' interpreter (CPU)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mixtral_jax as mj
from mixtral_jax.config import GmmImpl
from mixtral_jax.kernels import gmm_pallas
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.model import lora
from mixtral_jax.model import moe as moe_block
from mixtral_jax.moe import data_parallel
from mixtral_jax.parallel import sharding as sh

TINY = {"embed_dim": 16, "hidden_dim": 32, "num_experts": 4, "num_experts_per_tok": 2}
B, T = 4, 6  # M = 24 tokens


@pytest.fixture
def interpreted_pallas(monkeypatch):
    real = gmm_pallas.gmm
    monkeypatch.setattr(gmm_pallas, "gmm", lambda l, r, g: real(l, r, g, True))


def _block(cfg, seed=0):
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(seed))
    block.router[...] = block.router[...] * 20.0  # decisive routing: every path picks alike
    return block


def _plan(cfg, mesh, gmm, tokens=B * T):
    """The plan of a full forward on `mesh`; pallas as resolved on an NVIDIA GPU."""
    where = kernel_plan.NVIDIA_GPU if gmm == "pallas" else "cpu"
    plan = kernel_plan.resolve(cfg, tokens, cached=False, mesh=mesh, where=where)
    assert plan.grouped_matmul == GmmImpl(gmm) and plan.token_mesh is mesh
    return plan


def _value_and_grads(block, x, mask, plan, mesh=None, wrt=nnx.Param):
    """(out, aux, (d wrt-variables, d x)) of sum(out * probe) + both aux losses, jitted. On
    `mesh`, the variables replicated and x and mask split by rows over its batch axes where
    they divide them (else whole: the dispatch pads and splits them), and then the compiled
    program holds no all-gather (no token rows gathered: the structural check)."""
    graphdef, diff, rest = nnx.split(block, wrt, ...)
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def loss(diff, x, mask, rest):
        out, aux = nnx.merge(graphdef, diff, rest)(x, mask, plan=plan)
        return jnp.sum(out * probe) + aux.load_balance_loss + aux.router_z_loss, (out, aux)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    split = False
    if mesh is not None:
        diff, rest = jax.device_put((diff, rest), NamedSharding(mesh, P()))
        split = x.shape[0] % math.prod(mesh.shape[a] for a in sh.data_parallel_axes(mesh)) == 0
    if split:
        x = jax.device_put(x, sh.batch_sharding(mesh, 3))
        mask = jax.device_put(mask, sh.batch_sharding(mesh, 2))
    compiled = jax.jit(grad).lower(diff, x, mask, rest).compile()
    assert not split or "all-gather" not in compiled.as_text()
    (_, (out, aux)), grads = compiled(diff, x, mask, rest)
    return out, aux, grads


def _assert_close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale)


def _inputs(cfg, tokens):
    x = jax.random.normal(jax.random.key(1), (*tokens, cfg.embed_dim))
    mask = jnp.ones(tokens, jnp.float32).at[0, :2].set(0.0)  # left padding: out of the aux
    return x, mask


def _mesh(spec):
    return sh.make_mesh(sh.MeshConfig.parse(spec), jax.devices()[:4])


@pytest.mark.parametrize(
    "gmm,spec,tokens",
    [
        ("pallas", "data=2,fsdp=2", (4, 6)),
        ("megablox", "fsdp=4", (3, 5)),  # 15 tokens over 4 devices: padded to 16, cut again
    ],
)
def test_per_device_dropless_equals_the_one_device_dense_oracle(
    interpreted_pallas, gmm, spec, tokens
):
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl=gmm)
    mesh = _mesh(spec)
    block, (x, mask) = _block(cfg), _inputs(cfg, tokens)
    m = tokens[0] * tokens[1]
    got = _value_and_grads(block, x, mask, _plan(cfg, mesh, gmm, m), mesh)
    oracle = cfg.replace(moe_impl="dense", gmm_impl="xla")
    dense = kernel_plan.resolve(oracle, m, cached=False, mesh=None)
    want = _value_and_grads(block, x, mask, dense)
    _assert_close(got, want)  # out, every aux field (losses, counts, router logits), gradients
    assert int(jnp.sum(got[1].tokens_per_expert)) == (m - 2) * 2


def test_the_plan_runs_per_device_only_for_a_kernel_on_batch_axes_without_expert_axis():
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")

    def token_mesh(cfg, spec):
        mesh = None if spec is None else _mesh(spec)
        return kernel_plan.resolve(cfg, 16, cached=False, mesh=mesh, where="cpu").token_mesh

    assert token_mesh(cfg, "data=4") is not None
    assert token_mesh(cfg.replace(gmm_impl="xla"), "data=4") is None  # XLA partitions it
    assert token_mesh(cfg.replace(moe_impl="capacity"), "data=4") is None
    assert token_mesh(cfg, "data=2,expert=2") is None  # expert-parallel
    assert token_mesh(cfg, "tensor=4") is None and token_mesh(cfg, None) is None
    with pytest.raises(ValueError, match="has no batch axis > 1 without an expert axis"):
        data_parallel.moe_per_device(None, None, (), mesh=_mesh("tensor=4"))


def test_qlora_experts_take_the_per_device_path():
    """int8 experts with an adapter on w_gate: moe_dropless_lora per device, its grouped matmul
    dequantizing each code matrix, against the dense oracle on the merged weights
    dequantize(W) + A B s (lora.expert_dispatch's merge); forward and aux. (The adapters are
    closed over like the router, whose gradient the test above checks.)"""
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox", expert_bits=8)
    mesh = _mesh("data=2,fsdp=2")
    block, (x, mask) = _block(cfg), _inputs(cfg, (B, T))
    keys = jax.random.split(jax.random.key(5), 2)
    block.lora_w_gate_a = lora.Adapter(0.3 * jax.random.normal(keys[0], (4, 16, 3)))  # [E, D, r]
    block.lora_w_gate_b = lora.Adapter(0.3 * jax.random.normal(keys[1], (4, 3, 32)))
    block.lora_scale = 2.0
    graphdef, state = nnx.split(block)
    oracle = cfg.replace(moe_impl="dense", gmm_impl="xla")
    dense = kernel_plan.resolve(oracle, B * T, cached=False, mesh=None)
    want = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m, plan=dense))(state, x, mask)
    plan = _plan(cfg, mesh, "megablox")
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x = jax.device_put(x, sh.batch_sharding(mesh, 3))
    got = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m, plan=plan))(state, x, mask)
    _assert_close(got, want)


def test_a_cached_call_takes_its_layer_of_the_stacks_per_device():
    """A decode-sized cached call (3 tokens over 4 devices: padded) reading layer 1 of
    [L, E, ...] stacks: per device it gets that layer's weights, and equals the dense oracle."""
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    block, (x, _) = _block(cfg), _inputs(cfg, (3, 1))
    layer_weights = {}
    for i, name in enumerate(("w_gate", "w_up", "w_down")):
        w = getattr(block, name)
        layer_weights[name] = 0.5 * jax.random.normal(jax.random.key(i), w.shape)
        setattr(block, name, nnx.Param(jnp.stack([w[...], layer_weights[name]])))  # [L=2, ...]
    mesh = _mesh("data=2,fsdp=2")
    plan = kernel_plan.resolve(cfg, 3, cached=True, mesh=mesh, where="cpu")
    assert plan.token_mesh is mesh
    graphdef, state = nnx.split(block)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, layer=jnp.int32(1), plan=plan)[0])
    dense = _block(cfg.replace(moe_impl="dense"))
    for name, w in layer_weights.items():
        getattr(dense, name)[...] = w
    want = nnx.jit(lambda m, x: m(x)[0])(dense, x)
    np.testing.assert_allclose(run(state, x), want, rtol=1e-5, atol=1e-5)


def test_the_global_path_gathers_the_tokens():
    """What the per-device path removes (and `_value_and_grads` checks it did): the same layer
    traced on the global tokens all-gathers them (and the router logits, for one top-k)."""
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    mesh = _mesh("data=2,fsdp=2")
    global_path = dataclasses.replace(_plan(cfg, mesh, "megablox"), token_mesh=None)
    block, (x, mask) = _block(cfg), _inputs(cfg, (B, T))
    graphdef, state = nnx.split(block)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m, plan=global_path))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x = jax.device_put(x, sh.batch_sharding(mesh, 3))
    mask = jax.device_put(mask, sh.batch_sharding(mesh, 2))
    assert "all-gather" in fn.lower(state, x, mask).compile().as_text()
