"""Shardings of quantized weights: codes as their weight, scales with the K/G axis whole; the
memory planner counts codes and scales as stored."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import mixtral_jax as mj
from mixtral_jax import plan
from mixtral_jax.kernels import quant
from mixtral_jax.parallel import sharding as sh

CFG = mj.ModelConfig.tiny(expert_bits=4, attention_bits=8, quant_group_size=32)


def test_codes_shard_as_their_weight_and_scales_keep_groups_whole():
    mesh = sh.make_mesh(sh.MeshConfig(fsdp=2, expert=2, tensor=2), jax.devices()[:8])
    specs = jax.tree.map(lambda s: s.spec, sh.param_shardings(mj.param_shapes(CFG), mesh))
    float_specs = jax.tree.map(
        lambda s: s.spec, sh.param_shardings(mj.param_shapes(mj.ModelConfig.tiny()), mesh)
    )
    moe, attn = specs["layers"]["moe"], specs["layers"]["attn"]
    assert (
        moe["w_gate"]
        == float_specs["layers"]["moe"]["w_gate"]
        == P(None, "expert", "fsdp", "tensor")
    )
    assert moe["w_gate_scale"] == P(None, "expert", None, "tensor")
    assert moe["w_down_scale"] == P(None, "expert", None, "fsdp")
    assert attn["q_proj"] == P(None, "fsdp", "tensor") and attn["o_proj"] == P(
        None, "tensor", "fsdp"
    )
    assert attn["k_proj_scale"] == P(None, None, "tensor")


def test_sharded_quantized_init_equals_the_unsharded_one():
    mesh = sh.make_mesh(sh.MeshConfig(fsdp=2, expert=2), jax.devices()[:4])
    sharded = mj.init_params(CFG, mesh, seed=3)
    whole = mj.get_params(mj.init(CFG, 3))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(whole)):
        assert a.dtype == b.dtype, path
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype == np.uint8:  # compare int4 codes unpacked
            a, b = np.asarray(quant.unpack_int4(a)), np.asarray(quant.unpack_int4(b))
        if a.dtype == np.int8:  # a float32 ulp of jit-fused init may round a code the other way
            assert np.max(np.abs(a.astype(int) - b)) <= 1 and np.mean(a != b) < 1e-3, path
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=str(path))


def test_the_planner_counts_quantized_bytes():
    l, e, d, f, g = 2, 4, 64, 96, 32
    experts = l * e * 3 * (d * f // 2 + d * f // g * 4)  # int4 codes, float32 scales
    qkv = d * CFG.head_dim * (2 * CFG.num_heads + 2 * CFG.num_kv_heads)
    attention = l * (qkv + qkv // g * 4)  # int8 codes, float32 scales
    rest = 4 * (2 * CFG.vocab_size * d + d + l * (2 * d + d * e))  # float32
    one = plan.weights_per_device(CFG, sh.MeshConfig(), jax.devices()[:1])
    assert one == experts + attention + rest
    halves = plan.weights_per_device(CFG, sh.MeshConfig(expert=2), jax.devices()[:2])
    assert halves == experts // 2 + attention + rest
