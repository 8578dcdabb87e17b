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


def _value_and_grads(block, x, mask, plan, mesh=None, wrt=(0, 1)):
    """(out, aux, grads) of sum(out * probe) + both aux losses, jitted; grads in the state
    (wrt 0) and x (wrt 1). On `mesh`, the parameters replicated and x and mask split by rows
    over its batch axes where they divide them (else whole: the dispatch splits them)."""
    graphdef, state = nnx.split(block)
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def loss(state, x, mask):
        out, aux = nnx.merge(graphdef, state)(x, mask, plan=plan)
        return jnp.sum(out * probe) + aux.load_balance_loss + aux.router_z_loss, (out, aux)

    grad = jax.value_and_grad(loss, argnums=wrt, has_aux=True)
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, P()))
        if x.shape[0] % math.prod(mesh.shape[a] for a in data_parallel.token_axes(mesh)) == 0:
            x = jax.device_put(x, sh.batch_sharding(mesh, 3))
            mask = jax.device_put(mask, sh.batch_sharding(mesh, 2))
    (_, (out, aux)), grads = jax.jit(grad)(state, x, mask)
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


@pytest.mark.parametrize("variant", ["lora", "int8"])
def test_lora_and_quantized_experts_take_the_per_device_path(variant):
    """Expert adapters (moe_dropless_lora) against the dense oracle on the merged weights
    W + A B s; int8 experts (the grouped matmul dequantizes each) against the same block's
    one-device path. Forward, aux and d x."""
    bits = 8 if variant == "int8" else 16
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox", expert_bits=bits)
    mesh = _mesh("data=2,fsdp=2")
    block, (x, mask) = _block(cfg), _inputs(cfg, (B, T))
    plan = _plan(cfg, mesh, "megablox")
    if variant == "int8":
        want = _value_and_grads(block, x, mask, dataclasses.replace(plan, token_mesh=None), wrt=1)
    else:
        oracle = _block(cfg.replace(moe_impl="dense"))
        keys = jax.random.split(jax.random.key(5), 2)
        a = 0.3 * jax.random.normal(keys[0], (4, 16, 3))  # [E, D, r] on w_gate
        b = 0.3 * jax.random.normal(keys[1], (4, 3, 32))
        oracle.w_gate[...] = lora.merged_weight(block.w_gate[...], a, b, 2.0, 1)
        block.lora_w_gate_a, block.lora_w_gate_b = lora.Adapter(a), lora.Adapter(b)
        block.lora_scale = 2.0
        dense = kernel_plan.resolve(oracle.cfg, B * T, cached=False, mesh=None)
        want = _value_and_grads(oracle, x, mask, dense, wrt=1)
    _assert_close(_value_and_grads(block, x, mask, plan, mesh, wrt=1), want)


def _compiled_hlo(plan, mesh):
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    block, (x, mask) = _block(cfg), _inputs(cfg, (B, T))
    graphdef, state = nnx.split(block)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m, plan=plan))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x = jax.device_put(x, sh.batch_sharding(mesh, 3))
    return fn.lower(state, x, jax.device_put(mask, sh.batch_sharding(mesh, 2))).compile().as_text()


def test_the_compiled_layer_gathers_no_tokens():
    """Replicated weights and row-split tokens: the per-device program has no all-gather (its
    only collectives are the aux sums' all-reduces); the global path all-gathers the rows."""
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    mesh = _mesh("data=2,fsdp=2")
    plan = _plan(cfg, mesh, "megablox")
    assert "all-gather" not in _compiled_hlo(plan, mesh)
    assert "all-gather" in _compiled_hlo(dataclasses.replace(plan, token_mesh=None), mesh)
