"""JAX's megablox grouped matmul (gmm_megablox.py), run in Pallas' interpreter on CPU: forward,
d lhs and d rhs against a per-group loop, then through the dropless MoE, a cached call's weight
stack and the expert-parallel exchange against the dense oracle; and where the plan picks it."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.config import ConfigError, DecodeExpertImpl, GmmImpl
from mixtral_jax.kernels import gmm_megablox
from mixtral_jax.kernels import grouped_matmul as grouped_matmul_module
from mixtral_jax.kernels.grouped_matmul import grouped_matmul, grouped_matmul_stacked
from mixtral_jax.kernels.plan import NVIDIA_GPU, resolve
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.moe import expert_parallel as moe_parallel
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops
from mixtral_jax.parallel import sharding as sh


def _per_group_loop(lhs, rhs, dy, sizes):
    """The slow obvious oracle in float64: out, d lhs, d rhs one group at a time; rows past
    the groups zero."""
    lhs, rhs, dy = (np.asarray(a, np.float64) for a in (lhs, rhs, dy))
    out, d_lhs, d_rhs = np.zeros(dy.shape), np.zeros(lhs.shape), np.zeros(rhs.shape)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ rhs[g]
        d_lhs[rows] = dy[rows] @ rhs[g].T
        d_rhs[g] = lhs[rows].T @ dy[rows]
        start += size
    return out, d_lhs, d_rhs


@pytest.mark.parametrize(
    "rows,k,n,sizes,dtype",
    [
        (40, 16, 24, [7, 0, 20, 5], jnp.float32),  # uneven, an empty group, 8 rows past the sum
        (600, 16, 24, [0, 300, 0, 297], jnp.float32),  # 2 row tiles of 512, a group across both
        (24, 1040, 16, [0, 17, 0], jnp.float32),  # K > 1024: a partial K tile (an N tile in d lhs)
        (16, 16, 24, [0, 0, 0], jnp.float32),  # every group empty: all zeros
        (48, 32, 16, [16, 1, 31], jnp.bfloat16),
    ],
)
def test_kernel_equals_a_per_group_loop_forward_and_both_gradients(rows, k, n, sizes, dtype):
    keys = jax.random.split(jax.random.key(rows + k + n), 3)
    lhs = jax.random.normal(keys[0], (rows, k), dtype)
    rhs = jax.random.normal(keys[1], (len(sizes), k, n), dtype)
    dy = jax.random.normal(keys[2], (rows, n), dtype)
    gs = jnp.asarray(sizes, jnp.int32)

    @jax.jit
    def run(lhs, rhs, dy):
        out, vjp = jax.vjp(lambda x, w: gmm_megablox.gmm(x, w, gs, interpret=True), lhs, rhs)
        return (out, *vjp(dy))

    got = run(lhs, rhs, dy)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, g, want in zip(("out", "d lhs", "d rhs"), got, _per_group_loop(lhs, rhs, dy, sizes)):
        assert g.shape == want.shape and g.dtype == dtype, name
        g = np.asarray(g, np.float64)
        np.testing.assert_allclose(
            g, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1), err_msg=name
        )
    for name, g in zip(("out", "d lhs"), got[:2]):  # exact zeros past the groups, not NaN
        assert np.all(np.asarray(g)[sum(sizes) :] == 0), name


def test_tiles_are_maxtexts_and_legal_tpu_blocks():
    """MaxText's (512, 1024, 1024) at Mixtral widths; smaller widths are one full block; every
    tile is the whole width or a multiple of the TPU's 128 lanes (rows: of 8 sublanes)."""
    assert gmm_megablox.tiling(32768, 4096, 14336) == (512, 1024, 1024)
    assert gmm_megablox.tiling(32768, 14336, 4096) == (512, 1024, 1024)  # d lhs of w_down
    assert gmm_megablox.tiling(20, 16, 24) == (24, 16, 24)
    for rows in (1, 7, 300, 512, 513, 40000):
        for width in (16, 100, 1024, 1040, 6144):
            tm, tk, tn = gmm_megablox.tiling(rows, width, 32)
            assert tm % 8 == 0 and tm <= 512 and tm >= min(rows, 512)
            assert tk == width or tk % 128 == 0
            assert tn == 32


def test_plan_picks_megablox_on_tpu_and_refuses_it_where_it_cannot_run():
    def gmm(where, **change):
        return resolve(mj.ModelConfig.tiny(**change), 64, cached=False, where=where).grouped_matmul

    assert gmm("tpu") == GmmImpl.MEGABLOX
    assert gmm("tpu", dtype="bfloat16") == GmmImpl.MEGABLOX
    assert gmm("tpu", dtype="float16") == GmmImpl.XLA  # a dtype the kernels do not take
    assert (gmm("cpu"), gmm(NVIDIA_GPU)) == (GmmImpl.XLA, GmmImpl.PALLAS)
    assert gmm("cpu", gmm_impl="megablox") == GmmImpl.MEGABLOX  # interpreted
    assert gmm("tpu", gmm_impl="xla") == GmmImpl.XLA
    # one token on TPU: megablox reads only the chosen experts, so no gathered path
    one = resolve(mj.ModelConfig.tiny(), 1, cached=True, where="tpu")
    assert (one.grouped_matmul, one.decode_experts) == (GmmImpl.MEGABLOX, DecodeExpertImpl.OFF)
    gpu = "needs a TPU (or the CPU, interpreted), but the platform is 'nvidia_gpu'"
    half = "computes in float32 or bfloat16, but dtype is float16"
    refused = [(NVIDIA_GPU, {}, gpu), ("tpu", {"dtype": "float16"}, half)]
    for where, change, message in refused:
        full = f"gmm_impl='megablox' {message}; use 'auto' or 'xla'"
        with pytest.raises(ConfigError, match=re.escape(full)) as e:
            gmm(where, gmm_impl="megablox", **change)
        assert "\n" not in str(e.value)


def test_megablox_is_compiled_on_tpu_and_interpreted_elsewhere(monkeypatch):
    seen = []
    monkeypatch.setattr(gmm_megablox, "gmm", lambda l, r, g, interpret: seen.append(interpret))
    lhs, rhs, gs = jnp.zeros((4, 8)), jnp.zeros((2, 8, 16)), jnp.asarray([1, 3])
    for where in ("tpu", "cpu"):
        monkeypatch.setattr(grouped_matmul_module, "platform", lambda where=where: where)
        grouped_matmul(lhs, rhs, gs, GmmImpl.MEGABLOX)
    assert seen == [False, True]


def _moe_weights(seed, m, d, f, e):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jnp.abs(jax.random.normal(keys[0], (m, d)))
    router = jax.random.normal(keys[1], (d, e))
    w = [
        0.3 * jax.random.normal(keys[i], s)
        for i, s in ((2, (e, d, f)), (3, (e, d, f)), (4, (e, f, d)))
    ]
    return x, router, w


def _value_and_grads(fn, router, x, *w):
    """(out, d x, d w_gate, d w_up, d w_down) of sum(sin(MoE(x))), routing included."""

    def loss(x, *w):
        out, _ = fn(x, moe_ops.route(x, router, 2), *w)
        return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(x, *w)
    return out, *grads


def _assert_close(got, want):
    """Each output within 1e-5 of the oracle relative to the oracle's largest magnitude (the
    suite's float32 criterion): elementwise, a gradient's sum over a different order of the
    same float32 terms can differ by a few ulps of its largest terms."""
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        assert float(np.max(np.abs(a - b))) / scale <= 1e-5, float(np.max(np.abs(a - b))) / scale


def test_moe_dropless_through_megablox_equals_the_dense_oracle():
    """Uneven groups and an empty expert (the router never picks expert 3)."""
    x, router, w = _moe_weights(3, 12, 16, 32, 4)
    router = router.at[:, 3].add(-10.0)
    counts = np.bincount(np.asarray(moe_ops.route(x, router, 2).experts).ravel(), minlength=4)
    assert counts[3] == 0 and len(set(counts[:3])) > 1
    megablox = functools.partial(moe_local.moe_dropless, gmm_impl=GmmImpl.MEGABLOX)
    got = jax.jit(functools.partial(_value_and_grads, megablox))(router, x, *w)
    _assert_close(got, _value_and_grads(moe_local.moe_dense, router, x, *w))


def test_stacked_megablox_reads_the_chosen_layer_of_the_stack():
    keys = jax.random.split(jax.random.key(7), 2)
    lhs = jax.random.normal(keys[0], (20, 16))
    stack = jax.random.normal(keys[1], (3, 4, 16, 32))  # [L, E, D, F]
    gs = jnp.asarray([5, 0, 9, 6], jnp.int32)
    run = jax.jit(lambda x, w, i: grouped_matmul_stacked(x, w, gs, i, GmmImpl.MEGABLOX))
    for layer in (0, 2):
        np.testing.assert_allclose(
            run(lhs, stack, layer), jax.lax.ragged_dot(lhs, stack[layer], gs), rtol=1e-5, atol=1e-5
        )
    flat = grouped_matmul(lhs, stack[1], gs, GmmImpl.MEGABLOX)  # the entry point, unstacked
    np.testing.assert_allclose(flat, jax.lax.ragged_dot(lhs, stack[1], gs), rtol=1e-5, atol=1e-5)


def test_expert_parallel_ragged_exchange_through_megablox_equals_the_dense_oracle():
    """expert=4 x data=2, the ragged exchange (collective emulated on CPU): every assignment
    goes to experts 0 and 1, so three of the four expert shards run the kernel on all-empty
    groups and shard 0 on a full receive buffer."""
    mesh = sh.make_mesh(sh.MeshConfig.parse("expert=4,data=2"))
    x, router, w = _moe_weights(1, 32, 16, 24, 8)
    router = router.at[:, :2].add(10.0)
    assert bool(jnp.all(moe_ops.route(x, router, 2).experts < 2))
    ep = functools.partial(
        moe_parallel.moe_expert_parallel,
        mesh=mesh,
        exchange="ragged_emulated",
        gmm_impl=GmmImpl.MEGABLOX,
    )
    got = jax.jit(functools.partial(_value_and_grads, ep))(router, x, *w)
    _assert_close(got, _value_and_grads(moe_local.moe_dense, router, x, *w))


def test_a_cached_model_call_through_megablox_equals_the_dense_oracle(monkeypatch):
    """The tiny model with gmm_impl='megablox': a prefill into the KV cache (a cached call, whose
    experts megablox reads from the [L, E, ...] stacks in place) equals the dense model's full
    forward. (The uncached path is the dropless test above.)"""
    stacked = []
    real = gmm_megablox.gmm_stacked
    monkeypatch.setattr(
        gmm_megablox, "gmm_stacked", lambda *a: stacked.append(a[1].shape) or real(*a)
    )
    cfg = mj.ModelConfig.tiny(gmm_impl="megablox")
    params = mj.get_params(mj.init(cfg, 1))
    model, oracle = (
        mj.from_params(cfg, params),
        mj.from_params(cfg.replace(moe_impl="dense"), params),
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 7)))
    want = oracle(tokens).logits
    graphdef, state = nnx.split(model)
    prefill = jax.jit(
        lambda s, t: nnx.merge(graphdef, s).extend(
            t,
            KVCache.create(cfg, 2, 8),
            positions=jnp.broadcast_to(jnp.arange(7), (2, 7)),
            valid=jnp.ones(t.shape, bool),
        )
    )
    got, _ = prefill(state, tokens)
    np.testing.assert_allclose(got.logits, want, rtol=1e-5, atol=1e-5)
    layers, experts = cfg.num_layers, cfg.num_experts
    assert stacked and all(s[:2] == (layers, experts) for s in stacked)  # whole stacks
