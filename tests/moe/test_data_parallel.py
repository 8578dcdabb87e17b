"""The Pallas / megablox dropless MoE on a mesh without an expert axis runs per device
(moe/data_parallel.py): the MoE layer equals the one-device dense oracle (forward, gradients,
aux), with LoRA adapters and quantized experts too, and its compiled program gathers no tokens.
The kernels run in Pallas' interpreter (CPU)."""

import dataclasses

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

TINY = dict(embed_dim=16, hidden_dim=32, num_experts=4, num_experts_per_tok=2)
B, T = 4, 6  # M = 24 tokens


@pytest.fixture
def interpreted_pallas(monkeypatch):
    real = gmm_pallas.gmm
    monkeypatch.setattr(gmm_pallas, "gmm", lambda l, r, g: real(l, r, g, True))


def _block(cfg, seed=0):
    block = moe_block.MoE(cfg, rngs=nnx.Rngs(seed))
    block.router[...] = block.router[...] * 20.0  # decisive routing: every path picks alike
    return block


def _plan(cfg, mesh, gmm):
    """The plan of a full forward on `mesh`; pallas as resolved on an NVIDIA GPU."""
    where = kernel_plan.NVIDIA_GPU if gmm == "pallas" else "cpu"
    plan = kernel_plan.resolve(cfg, B * T, cached=False, mesh=mesh, where=where)
    assert plan.grouped_matmul == GmmImpl(gmm) and plan.token_mesh is mesh
    return plan


def _value_and_grads(block, x, mask, plan, mesh=None):
    """(out, aux, (d state, d x)) of sum(out * probe) + both aux losses, jitted; on `mesh`, x
    and mask split by rows over its batch axes and the parameters replicated."""
    graphdef, state = nnx.split(block)
    probe = jax.random.normal(jax.random.key(9), x.shape)

    def loss(state, x, mask):
        out, aux = nnx.merge(graphdef, state)(x, mask, plan=plan)
        return jnp.sum(out * probe) + aux.load_balance_loss + aux.router_z_loss, (out, aux)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if mesh is not None:
        rows = sh.batch_sharding(mesh, 2)
        x = jax.device_put(x, sh.batch_sharding(mesh, 3))
        mask = jax.device_put(mask, rows)
        state = jax.device_put(state, NamedSharding(mesh, P()))
    (_, (out, aux)), grads = jax.jit(grad)(state, x, mask)
    return out, aux, grads


def _assert_close(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale)


def _inputs(cfg, tokens=(B, T)):
    x = jax.random.normal(jax.random.key(1), (*tokens, cfg.embed_dim))
    mask = jnp.ones(tokens, jnp.float32).at[0, :2].set(0.0)  # left padding: out of the aux
    return x, mask


@pytest.mark.parametrize(
    "gmm,spec", [("pallas", "data=2,fsdp=2"), ("megablox", "data=2,fsdp=2"), ("pallas", "fsdp=4")]
)
def test_per_device_dropless_equals_the_one_device_dense_oracle(interpreted_pallas, gmm, spec):
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl=gmm)
    mesh = sh.make_mesh(sh.MeshConfig.parse(spec), jax.devices()[:4])
    block, (x, mask) = _block(cfg), _inputs(cfg)
    got = _value_and_grads(block, x, mask, _plan(cfg, mesh, gmm), mesh)
    oracle = cfg.replace(moe_impl="dense", gmm_impl="xla")
    dense = kernel_plan.resolve(oracle, B * T, cached=False, mesh=None)
    want = _value_and_grads(block, x, mask, dense)
    _assert_close(got, want)  # out, every aux field (losses, counts, router logits), gradients
    assert int(jnp.sum(got[1].tokens_per_expert)) == (B * T - 2) * 2


def test_uneven_tokens_are_padded_and_a_mesh_without_batch_axes_is_refused():
    """15 tokens over data=2 x fsdp=2: padded to 16 and cut; ragged_dot keeps the global path."""
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    mesh = sh.make_mesh(sh.MeshConfig.parse("data=2,fsdp=2"), jax.devices()[:4])
    block, (x, mask) = _block(cfg), _inputs(cfg, (3, 5))
    got = _value_and_grads(block, x, mask, _plan(cfg, mesh, "megablox"))
    dense = kernel_plan.resolve(cfg.replace(moe_impl="dense"), 15, cached=False, mesh=None)
    _assert_close(got, _value_and_grads(block, x, mask, dense))
    xla = kernel_plan.resolve(cfg.replace(gmm_impl="xla"), 16, cached=False, mesh=mesh)
    expert = sh.make_mesh(sh.MeshConfig.parse("data=2,expert=2"), jax.devices()[:4])
    assert xla.token_mesh is None and _plan_mesh(cfg, expert) is None
    tensor = sh.make_mesh(sh.MeshConfig.parse("tensor=2"), jax.devices()[:2])
    assert _plan_mesh(cfg, tensor) is None
    with pytest.raises(ValueError, match="has no batch axis > 1 without an expert axis"):
        data_parallel.moe_per_device(None, x, None, (), mesh=tensor)


def _plan_mesh(cfg, mesh):
    return kernel_plan.resolve(cfg, 16, cached=False, mesh=mesh, where="cpu").token_mesh


@pytest.mark.parametrize("variant", ["lora", "int8"])
def test_lora_and_quantized_experts_take_the_per_device_path(variant):
    """Expert adapters (moe_dropless_lora) against the dense oracle on the merged weights
    W + A B s; int8 experts (the grouped matmul dequantizes each) against the same block's
    one-device path."""
    bits = 8 if variant == "int8" else 16
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox", expert_bits=bits)
    mesh = sh.make_mesh(sh.MeshConfig.parse("data=2,fsdp=2"), jax.devices()[:4])
    block, (x, mask) = _block(cfg), _inputs(cfg)
    plan = _plan(cfg, mesh, "megablox")
    if variant == "int8":
        one_device = dataclasses.replace(plan, token_mesh=None)
        want = _value_and_grads(block, x, mask, one_device)
    else:
        oracle = _block(cfg.replace(moe_impl="dense"))
        keys = jax.random.split(jax.random.key(5), 2)
        a = 0.3 * jax.random.normal(keys[0], (4, 16, 3))  # [E, D, r] on w_gate
        b = 0.3 * jax.random.normal(keys[1], (4, 3, 32))
        oracle.w_gate[...] = lora.merged_weight(block.w_gate[...], a, b, 2.0, 1)
        block.lora_w_gate_a, block.lora_w_gate_b = lora.Adapter(a), lora.Adapter(b)
        block.lora_scale = 2.0
        dense = kernel_plan.resolve(oracle.cfg, B * T, cached=False, mesh=None)
        want = _value_and_grads(oracle, x, mask, dense)
    got = _value_and_grads(block, x, mask, plan, mesh)
    _assert_close(got[:2], want[:2])
    _assert_close(got[2][1], want[2][1])  # d x (the state trees differ by the adapters)


def _compiled_hlo(plan, mesh):
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    block, (x, mask) = _block(cfg), _inputs(cfg)
    graphdef, state = nnx.split(block)
    fn = jax.jit(lambda s, x, m: nnx.merge(graphdef, s)(x, m, plan=plan))
    state = jax.device_put(state, NamedSharding(mesh, P()))
    x = jax.device_put(x, sh.batch_sharding(mesh, 3))
    return fn.lower(state, x, jax.device_put(mask, sh.batch_sharding(mesh, 2))).compile().as_text()


def test_the_compiled_layer_gathers_no_tokens():
    """Replicated weights and row-split tokens: the per-device program has no all-gather (its
    only collectives are the aux sums' all-reduces); the global path all-gathers the rows."""
    cfg = mj.ModelConfig.tiny(**TINY, gmm_impl="megablox")
    mesh = sh.make_mesh(sh.MeshConfig.parse("data=2,fsdp=2"), jax.devices()[:4])
    plan = _plan(cfg, mesh, "megablox")
    assert "all-gather" not in _compiled_hlo(plan, mesh)
    assert "all-gather" in _compiled_hlo(dataclasses.replace(plan, token_mesh=None), mesh)
