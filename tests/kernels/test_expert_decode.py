"""The few-token (decode) kernels, run through Pallas' interpreter on CPU: the experts
(expert_decode.py) against the dense oracle `moe_local.moe_dense`, the stacked projections
(decode_matmul.py) against a plain matmul, and the model's cached decode through both against the
full forward. The GPU run of the same checks is in bench/expert_decode_tiles.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.kernels import common, decode_matmul, expert_decode
from mixtral_jax.kernels import decode_attention as flash_decode
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops


def _weights(key, layers, e, d, f, dtype):
    keys = jax.random.split(key, 3)
    return [
        (0.3 * jax.random.normal(k, (layers, e) + s)).astype(dtype)
        for k, s in zip(keys, ((d, f), (d, f), (f, d)))
    ]


def _dense(x, routing, w, layer):
    return moe_local.moe_dense(
        x.astype(jnp.float32), routing, *(a[layer].astype(jnp.float32) for a in w)
    )[0]


@pytest.mark.parametrize(
    "m,e,d,f,dtype,tol",
    [
        (1, 8, 64, 96, jnp.float32, 1e-5),  # batch-1 decode: 2 slots, F not a power of two
        (5, 4, 32, 48, jnp.float32, 1e-5),  # every expert a slot
        (3, 8, 64, 96, jnp.bfloat16, 1e-2),
    ],
)
def test_kernels_equal_the_dense_oracle_at_the_chosen_layer(m, e, d, f, dtype, tol):
    keys = jax.random.split(jax.random.key(m + e), 3)
    x = jax.random.normal(keys[0], (m, d), dtype)
    routing = moe_ops.route(x, jax.random.normal(keys[1], (d, e)).astype(dtype), 2)
    w = _weights(keys[2], 3, e, d, f, dtype)
    run = jax.jit(
        lambda x, ex, wt, *w: expert_decode.decode_experts(x, ex, wt, *w, layer=2, interpret=True)
    )
    got = run(x, routing.experts, routing.weights, *w)
    want = _dense(x, routing, w, 2)
    assert got.shape == (m, d) and got.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) <= tol


def test_unused_slots_add_nothing_and_repeated_experts_are_read_once():
    """Two tokens choosing the same two experts: 4 slots, 2 used; slots 2-3 must add zeros."""
    m, e, d, f = 2, 8, 32, 48
    keys = jax.random.split(jax.random.key(5), 2)
    x = jax.random.normal(keys[0], (m, d))
    routing = moe_ops.Routing(
        logits=jnp.zeros((m, e)),
        experts=jnp.asarray([[5, 2], [2, 5]], jnp.int32),
        weights=jnp.asarray([[0.7, 0.3], [0.6, 0.4]], jnp.float32),
    )
    slot_expert, num_used, combine = expert_decode._slots(routing.experts, routing.weights, e)
    assert slot_expert.tolist()[:2] == [2, 5] and int(num_used[0]) == 2
    np.testing.assert_allclose(combine[:2], [[0.3, 0.6], [0.7, 0.4]])
    w = _weights(keys[1], 1, e, d, f, jnp.float32)
    got = expert_decode.decode_experts(x, routing.experts, routing.weights, *w, interpret=True)
    np.testing.assert_allclose(got, _dense(x, routing, w, 0), rtol=1e-5, atol=1e-5)


def test_tiles_divide_the_problem_and_fit_shared_memory():
    t = common.fit(expert_decode.DOWN, 16, 14336, 4096, 1, 2)  # Mixtral 8x7B down
    assert (t.block_n, t.block_k, t.splits) == (
        expert_decode.DOWN.block_n,
        expert_decode.DOWN.block_k,
        expert_decode.DOWN.splits,
    )
    t = common.fit(expert_decode.DecodeTiles(128, 256, splits=4), 16, 96, 48, 1, 2)
    assert 96 % t.splits == 0 and (96 // t.splits) % t.block_k == 0 and 48 % t.block_n == 0
    wide = common.fit(
        expert_decode.DecodeTiles(128, 256, num_stages=6), 64, 4096, 14336, 2, 4
    )  # float32, two weight streams: fewer stages
    assert (
        wide.num_stages * (64 * wide.block_k + 2 * wide.block_k * wide.block_n) * 4
        <= common.SMEM_BYTES
    )
    assert 4096 % wide.block_k == 0 and 14336 % wide.block_n == 0
    with pytest.raises(ValueError, match="at most 64 tokens, got 65"):
        expert_decode.decode_experts(
            jnp.zeros((65, 16)),
            jnp.zeros((65, 2), jnp.int32),
            jnp.zeros((65, 2)),
            *_weights(jax.random.key(0), 1, 4, 16, 16, jnp.float32),
        )


def test_cached_decode_through_the_kernels_equals_the_full_forward(monkeypatch):
    """extend() with the GPU choice forced (kernels interpreted): for prefill and each decode
    step, every layer's MoE reads its layer of the expert stacks through decode_experts, its
    attention q, k, v and o and its router through decode_matmul, and each decode step's
    attention its layer of the cache through decode_attention, all in place."""
    calls, projections, attended = [], [], []
    real_attention = flash_decode.decode_attention

    def interpreted_attention(q, k_cache, v_cache, layer, mask, **kw):
        attended.append(k_cache.shape)  # the whole cache stack [L, B, S, K, H]
        return real_attention(q, k_cache, v_cache, layer, mask, **kw, interpret=True)

    real, real_projection = expert_decode.decode_experts, decode_matmul.project_stacked

    def interpreted(*args, **kw):
        calls.append(args[0].shape[0])
        return real(*args, **kw, interpret=True)

    def interpreted_projection(x, stacks, layer, **kw):
        assert all(s.shape[0] == 2 for s in stacks)  # whole stacks [L, ...], read at `layer`
        projections.append(tuple(s.shape[-1] for s in stacks))
        return real_projection(x, stacks, layer, **kw, interpret=True)

    cfg = mj.ModelConfig.tiny(moe_impl="dropless")
    model = mj.init(cfg, 1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 9)))
    valid = jnp.ones((2, 9), bool)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    full = model(tokens, valid.astype(jnp.int32), positions=positions).logits
    monkeypatch.setattr(kernel_plan, "platform", lambda: kernel_plan.NVIDIA_GPU)
    monkeypatch.setattr(expert_decode, "decode_experts", interpreted)
    monkeypatch.setattr(decode_matmul, "project_stacked", interpreted_projection)
    monkeypatch.setattr(flash_decode, "decode_attention", interpreted_attention)
    graphdef, state = nnx.split(model)
    extend = jax.jit(
        lambda s, t, c, p, v: nnx.merge(graphdef, s).extend(t, c, positions=p, valid=v)
    )
    cache = KVCache.create(cfg, 2, 16)
    out, cache = extend(state, tokens[:, :6], cache, positions[:, :6], valid[:, :6])
    steps = [out.logits]
    for t in range(6, 9):
        out, cache = extend(
            state, tokens[:, t : t + 1], cache, positions[:, t : t + 1], valid[:, t : t + 1]
        )
        steps.append(out.logits)
    got = jnp.concatenate(steps, axis=1)
    assert float(jnp.max(jnp.abs(got - full)) / jnp.max(jnp.abs(full))) <= 1e-5
    assert sorted(set(calls)) == [2, 12]  # traced once per shape: decode (B=2), prefill (2 x 6)
    # q, k, v in one launch; o in another; the router's 4 experts padded to 16 columns.
    assert set(projections) == {(64, 32, 32), (64,), (16,)}
    assert set(attended) == {(2, 2, 16, 2, 16)}  # decode steps only; prefill (T = 6) is XLA


@pytest.mark.parametrize(
    "m,widths,dtype,tol,row_tile",
    [
        (1, (64, 32, 32), jnp.float32, 1e-5, None),  # q, k, v of one token in one launch
        (3, (96,), jnp.float32, 1e-5, None),  # a width that only a 32-column tile divides
        (2, (64, 16), jnp.bfloat16, 1e-2, None),
        (150, (64, 32), jnp.float32, 1e-5, None),  # 3 row tiles of 64, the last partly padding
        (150, (64, 32), jnp.float32, 1e-5, 128),  # 2 row tiles of 128
        (300, (64, 32), jnp.float32, 1e-5, None),  # above WIDE: 3 row tiles of 128
        (256, (16,), jnp.float32, 1e-5, None),  # a router: 4 programs, K split in 4
    ],
)
def test_stacked_projection_equals_the_matmul_of_the_chosen_layer(m, widths, dtype, tol, row_tile):
    keys = jax.random.split(jax.random.key(m), len(widths) + 1)
    x = jax.random.normal(keys[0], (m, 64), dtype)
    stacks = [jax.random.normal(k, (3, 64, n), dtype) for k, n in zip(keys[1:], widths)]
    outs = jax.jit(
        lambda x, *s: decode_matmul.project_stacked(x, s, 1, row_tile=row_tile, interpret=True)
    )(x, *stacks)
    for out, stack in zip(outs, stacks):
        want = x.astype(jnp.float32) @ stack[1].astype(jnp.float32)
        assert out.shape == (m, stack.shape[-1]) and out.dtype == dtype
        assert (
            float(jnp.max(jnp.abs(out.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))) <= tol
        )


def test_a_narrow_projection_of_many_rows_splits_k_until_the_grid_is_full():
    """8x7B's router (N 16 padded, K 4096) at 256 rows: 4 row tiles x 1 column tile, K split
    in 16 (64 programs of 4 steps); q/k/v's 192 programs stay unsplit."""
    x = jax.ShapeDtypeStruct((256, 4096), jnp.bfloat16)
    router = jax.ShapeDtypeStruct((32, 4096, 16), jnp.bfloat16)
    qkv = jax.ShapeDtypeStruct((32, 4096, 4096), jnp.bfloat16)
    t = decode_matmul._fit(decode_matmul.ROWS, 64, (router,), 2)
    split = decode_matmul._split_narrow(t, 4, 64, (router,), x)
    assert t.splits == 1 and split.splits == 16 and 4096 % (16 * split.block_k) == 0
    t = decode_matmul._fit(decode_matmul.ROWS, 64, (qkv,), 2)
    assert decode_matmul._split_narrow(t, 4 * 32, 64, (qkv,), x) is t
