"""Where the training step's time goes, without the profiler: each part jitted alone, wall clock.

  PYTHONPATH=. python bench/train_parts.py [--fused-swiglu auto|on|off] [--small]

The model and batch of bench/train_step.py (2 layers at full 8x7B width, batch 4 x 4096, bf16
compute, float32 master weights + AdamW, dropless MoE; `--small`: a tiny model on the CPU).
Each part is its own jitted function, timed as the median of a few runs after warm-up
(`common.timed`, blocking on the result):

  (a) loss forward          the step's micro-batch loss (train/step.make_micro_loss)
  (b) value_and_grad        forward + backward of it
  (c) optimizer             tx.update + apply_updates on a gradient tree (state donated), then
      guarded update        the step's guarded_update: + global norm, the guard's predicate
      select guard (probe)  the guard as it was: checks of the written state, then a select
  (d) train step            make_train_step, the whole of it
  (e) MoE layer pieces      one layer's dropless dispatch at these sizes, forward and forward +
                            backward (a vjp with a random cotangent) of each piece alone: routing,
                            sort/permute, gate / up / down grouped matmuls, SwiGLU, the fused
                            gate+up+SwiGLU kernel, unsort/combine; and the whole layer
  (f) attention             the plan's attention kernel (cuDNN on the H200) fwd and fwd+bwd
      LM head + loss        final projection to the vocabulary and the cross-entropy
  (g) memory                XLA's compiled memory stats of the train step

The floor of a part is max(FLOPs / 650 TFLOP/s, bytes / 4.3 TB/s) (`--tflops`, `--tbs`), with
FLOPs and bytes as counted in `floors` below (forward + backward: 3x the forward's, the
project's convention). "share" is the part's time x how often a step runs it (L for the layer
parts) over the measured step time; pieces overlap (a layer's pieces are inside (b)), so the
shares do not sum to 1. Writes $OUT/train_parts.json.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mixtral_jax as mj
from bench import update_passes
from bench.common import environment, random_model, synthetic_batch, timed, write_json
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.kernels.grouped_matmul import grouped_matmul, grouped_swiglu
from mixtral_jax.model.attention import dot_product_attention, fused_attention, make_attention_mask
from mixtral_jax.moe import local as moe_local
from mixtral_jax.moe import ops as moe_ops
from mixtral_jax.parallel import sharding
from mixtral_jax.train import losses, metrics
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import (
    guarded_update,
    init_state,
    make_micro_loss,
    make_optimizer,
    make_train_step,
    state_shardings,
)


def config(small: bool, fused: str, layers: int, seq: int) -> mj.ModelConfig:
    common = {
        "num_layers": layers,
        "dtype": "bfloat16",
        "param_dtype": "float32",
        "moe_impl": "dropless",
        "fused_swiglu": fused,
        "max_seq_len": seq,
    }
    return mj.ModelConfig.tiny(**common) if small else mj.preset("mixtral-8x7b", **common)


class Table:
    """Rows of (part, ms, floor ms, basis, times per step); printed with shares of the step."""

    def __init__(self, tflops: float, tbs: float):
        self.tflops, self.tbs, self.rows = tflops, tbs, []

    def add(self, part: str, seconds: float, flops: float = 0.0, nbytes: float = 0.0, per=1):
        floor_s = max(flops / (self.tflops * 1e12), nbytes / (self.tbs * 1e12))
        basis = "flops" if flops / self.tflops >= nbytes / self.tbs else "bytes"
        row = {"part": part, "ms": 1e3 * seconds, "floor_ms": 1e3 * floor_s, "basis": basis}
        self.rows.append({**row, "per_step": per, "flops": flops, "bytes": nbytes})
        print(f"  {part}: {1e3 * seconds:.3f} ms (floor {1e3 * floor_s:.3f})", flush=True)

    def print(self, step_ms: float) -> None:
        print(f"\n{'part':<40} {'ms':>9} {'floor ms':>9} {'basis':>6} {'x/step':>6} {'share':>6}")
        for r in self.rows:
            r["share"] = r["ms"] * r["per_step"] / step_ms
            print(
                f"{r['part']:<40} {r['ms']:>9.2f} {r['floor_ms']:>9.2f} {r['basis']:>6} "
                f"{r['per_step']:>6} {r['share']:>6.1%}"
            )


def timed_carry(fn, carry, *args, repeats: int, warmup: int = 2):
    """Median seconds of carry = fn(carry, *args) (a donated state threaded through)."""
    for _ in range(warmup):
        carry = jax.block_until_ready(fn(carry, *args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(fn(carry, *args))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], carry


def fwd_and_fwd_bwd(fn, args, diff: tuple[int, ...], repeats: int):
    """(forward s, forward + backward s) of fn(*args): the output and its vjp w.r.t. args[i]
    for i in diff, with a random cotangent of the output's float leaves."""
    out = jax.eval_shape(fn, *args)
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    ct = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])

    def both(*a):
        def part(*d):
            full = list(a)
            for i, x in zip(diff, d):
                full[i] = x
            return fn(*full)

        out, vjp = jax.vjp(part, *(a[i] for i in diff))
        return out, vjp(ct)  # the output too: else XLA drops a forward the backward does not use

    return timed(jax.jit(fn), *args, repeats=repeats), timed(jax.jit(both), *args, repeats=repeats)


def moe_pieces(cfg: mj.ModelConfig, tokens: int, table: Table, repeats: int) -> None:
    """(e): one layer's dropless dispatch, piece by piece, at `tokens` rows of width D."""
    m, d, f, e, k = tokens, cfg.embed_dim, cfg.hidden_dim, cfg.num_experts, cfg.num_experts_per_tok
    a, dt, layers = m * k, jnp.bfloat16, cfg.num_layers
    gmm_impl = kernel_plan.resolve_gmm("auto", dtype=dt)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (m, d), dt)
    router = 0.02 * jax.random.normal(keys[1], (d, e), jnp.float32)
    w_gate, w_up = (0.02 * jax.random.normal(kk, (e, d, f), dt) for kk in keys[2:4])
    w_down = 0.02 * jax.random.normal(keys[4], (e, f, d), dt)
    routing = jax.jit(lambda x: moe_ops.route(x, router, k))(x)
    order, gs = jax.jit(lambda ex: moe_ops.sort_by_expert(ex, e))(routing.experts)
    x_sorted = x[order // k]
    gate = grouped_matmul(x_sorted, w_gate, gs, gmm_impl)
    up = grouped_matmul(x_sorted, w_up, gs, gmm_impl)
    h = moe_ops.swiglu(gate, up)
    y_sorted = grouped_matmul(h, w_down, gs, gmm_impl)
    routed = lambda o: (o.weights, o.logits)  # the float outputs of a Routing
    gmm_flops, act = 2 * a * d * f, a * f * 2  # one projection; one [A, F] bf16 activation
    pieces = [  # name, fn, args, differentiated args, forward flops, forward bytes
        (
            "route (router, softmax, top-k)",
            lambda x, r: routed(moe_ops.route(x, r, k)),
            (x, router),
            (0, 1),
            2 * m * d * e,
            m * d * 2 + m * e * 12,
        ),
        (
            "sort/permute (argsort, gather)",
            lambda x, ex: x[moe_ops.sort_by_expert(ex, e)[0] // k],
            (x, routing.experts),
            (0,),
            0,
            m * d * 2 + a * d * 2,
        ),
        (
            "gate gmm",
            lambda x, w: grouped_matmul(x, w, gs, gmm_impl),
            (x_sorted, w_gate),
            (0, 1),
            gmm_flops,
            0,
        ),
        (
            "up gmm",
            lambda x, w: grouped_matmul(x, w, gs, gmm_impl),
            (x_sorted, w_up),
            (0, 1),
            gmm_flops,
            0,
        ),
        ("swiglu", moe_ops.swiglu, (gate, up), (0, 1), 0, 3 * act),
        (
            "fused gate+up+swiglu",
            lambda x, wg, wu: grouped_swiglu(x, wg, wu, gs, gmm_impl),
            (x_sorted, w_gate, w_up),
            (0, 1, 2),
            2 * gmm_flops,
            act,
        ),
        (
            "down gmm",
            lambda h, w: grouped_matmul(h, w, gs, gmm_impl),
            (h, w_down),
            (0, 1),
            gmm_flops,
            0,
        ),
        (
            "unsort/combine",
            lambda y, w: moe_ops.unsort_and_combine(y, order, w),
            (y_sorted, routing.weights),
            (0, 1),
            2 * a * d,
            a * d * 2 + m * d * 4,
        ),
    ]
    w32 = (w_gate.astype(jnp.float32), w_up.astype(jnp.float32), w_down.astype(jnp.float32))
    pieces.append(  # the master weights' cast to the compute dtype, and its transpose
        (
            "cast experts f32->bf16",
            lambda *w: tuple(x.astype(dt) for x in w),
            w32,
            (0, 1, 2),
            0,
            3 * e * d * f * 6,
        )
    )
    for fused in (False, True):
        pieces.append(
            (
                f"MoE layer, {'fused' if fused else 'unfused'} swiglu",
                lambda x, wg, wu, wd, fused=fused: moe_local.moe_dropless(
                    x, moe_ops.route(x, router, k), wg, wu, wd, gmm_impl, fused_swiglu=fused
                )[0],
                (x, w_gate, w_up, w_down),
                (0, 1, 2, 3),
                3 * gmm_flops,
                m * d * 2 + a * d * 4 + 3 * act + m * d * 4,
            )
        )
    print(f"(e) MoE layer pieces: {m} tokens, {a} rows, grouped matmul {gmm_impl.value}")
    for name, fn, args, diff, flops, nbytes in pieces:
        fwd_s, both_s = fwd_and_fwd_bwd(fn, args, diff, repeats)
        table.add(f"{name} fwd", fwd_s, flops, nbytes, per=layers)
        table.add(f"{name} fwd+bwd", both_s, 3 * flops, 3 * nbytes, per=layers)


def attention_and_head(cfg, batch: int, seq: int, table: Table, repeats: int) -> None:
    """(f): the plan's attention kernel over B x T, and the LM head + cross-entropy."""
    b, t, n, kv, hd = batch, seq, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    impl = kernel_plan.resolve_attention("auto", "bfloat16", hd)
    keys = jax.random.split(jax.random.key(2), 6)
    q = jax.random.normal(keys[0], (b, t, n, hd), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (b, t, kv, hd), jnp.bfloat16) for kk in keys[1:3])
    mask = make_attention_mask(t, t, sliding_window=cfg.sliding_window)
    if impl == kernel_plan.AttentionImpl.CUDNN:
        attend = functools.partial(fused_attention, mask=mask, sliding_window=cfg.sliding_window)
    else:
        attend = functools.partial(dot_product_attention, mask=mask)
    flops = 2 * b * t * t * n * hd  # causal: half of the 4 B T^2 N H of full attention
    fwd_s, both_s = fwd_and_fwd_bwd(lambda q, k, v: attend(q, k, v), (q, k, v), (0, 1, 2), repeats)
    table.add(f"attention ({impl.value}) fwd", fwd_s, flops, 0, per=cfg.num_layers)
    table.add(f"attention ({impl.value}) fwd+bwd", both_s, 3 * flops, 0, per=cfg.num_layers)
    x = jax.random.normal(keys[3], (b, t, cfg.embed_dim), jnp.bfloat16)
    head = 0.02 * jax.random.normal(keys[4], (cfg.embed_dim, cfg.vocab_size), jnp.float32)
    targets = jax.random.randint(keys[5], (b, t), 0, cfg.vocab_size)

    def head_loss(x, w):
        logits = jnp.einsum("BTD,DV->BTV", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return losses.cross_entropy(logits, targets, jnp.ones((b, t)))[0]

    flops = 2 * b * t * cfg.embed_dim * cfg.vocab_size
    logit_bytes = b * t * cfg.vocab_size * 4
    fwd_s, both_s = fwd_and_fwd_bwd(head_loss, (x, head), (0, 1), repeats)
    table.add("LM head + CE fwd", fwd_s, flops, 2 * logit_bytes)
    table.add("LM head + CE fwd+bwd", both_s, 3 * flops, 6 * logit_bytes)


def memory_stats(compiled) -> dict:
    stats = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {n: getattr(stats, f"{n}_size_in_bytes", None) for n in names} if stats else {}


def model_parts(cfg, tc, batch: int, seq: int, table: Table, repeats: int):
    """(a)-(d) and (g): the step's own functions on the model. Returns (step ms, memory)."""
    params = mj.get_params(model := random_model(cfg))
    graphdef = nnx.graphdef(model)
    del model
    tx = make_optimizer(tc, params)
    state = init_state(params, tx, 0)
    del params
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    data = jax.tree.map(jnp.asarray, synthetic_batch(cfg.vocab_size, batch, seq))
    mb = jax.tree.map(lambda x: x[0], data)
    rng = jax.random.key(3)
    count = jnp.asarray(float(batch * seq))
    loss_fn = make_micro_loss(graphdef, tc)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    fpt, tokens = metrics.flops_per_token(cfg, seq), batch * seq

    def run_loss(p):
        with sharding.active(mesh):
            return loss_fn(p, {}, mb, rng, count)[0]

    def run_grad(p):
        with sharding.active(mesh):
            return jax.value_and_grad(loss_fn, has_aux=True)(p, {}, mb, rng, count)

    print("(a)-(c) the step's functions", flush=True)
    table.add(
        "(a) loss forward",
        timed(jax.jit(run_loss), state.params, repeats=repeats),
        tokens * fpt / 3,
    )
    grad = jax.jit(run_grad)
    table.add("(b) value_and_grad", timed(grad, state.params, repeats=repeats), tokens * fpt)
    (loss, _), grads = grad(state.params)
    del grad

    def plain(st, g):
        updates, opt = tx.update(g, st.opt_state, st.params)
        return st.replace(params=optax.apply_updates(st.params, updates), opt_state=opt)

    def guarded(st, g):
        params, opt, _, _ = guarded_update(tx, st, g, loss)
        return st.replace(params=params, opt_state=opt)

    def select_form(st, g):  # a measurement only: the guard as it was (bench/update_passes.py)
        params, opt, _, _ = update_passes.select_guard(tx, st, g, loss)
        return st.replace(params=params, opt_state=opt)

    opt_bytes = 28 * n_params  # f32 p, g, mu, nu read; p, mu, nu written
    for name, fn, nbytes in (
        ("(c) optimizer update+apply", plain, opt_bytes),
        # + the norm (g read), the predicate (g, mu, nu, p read; the update it checks unwritten)
        ("(c) guarded update (norm, finite)", guarded, opt_bytes + 20 * n_params),
        # + the norm, checks of the written p, mu, nu, a select of each against the old
        ("(c) select guard, as before (probe)", select_form, opt_bytes + 52 * n_params),
    ):
        seconds, state = timed_carry(
            jax.jit(fn, donate_argnums=(0,)), state, grads, repeats=repeats
        )
        table.add(name, seconds, 0, nbytes)
    del grads
    step_fn = make_train_step(
        graphdef, tx, tc, mesh=mesh, shardings=state_shardings(state.params, tx, mesh)
    )
    # The jitted step inside make_train_step's binding of its (empty) frozen input, compiled
    # once here: its memory stats, then it runs (as step_fn would).
    (jitted,) = [c.cell_contents for c in step_fn.__closure__ if hasattr(c.cell_contents, "lower")]
    compiled = jitted.lower(state, data, {}).compile()
    memory = memory_stats(compiled)
    step_s, state = timed_carry(lambda st, d: compiled(st, d, {})[0], state, data, repeats=repeats)
    table.add("(d) train step", step_s, tokens * fpt, opt_bytes)
    return 1e3 * step_s, memory, n_params


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="a tiny model (runs on the CPU)")
    p.add_argument("--fused-swiglu", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=None, help="default 4 (small: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 4096 (small: 64)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="model,moe,attention", help="which groups to run")
    p.add_argument("--tflops", type=float, default=650.0, help="matmul floor, TFLOP/s")
    p.add_argument("--tbs", type=float, default=4.3, help="memory floor, TB/s")
    args = p.parse_args()
    batch = args.batch or (2 if args.small else 4)
    seq = args.seq or (64 if args.small else 4096)
    cfg = config(args.small, args.fused_swiglu, args.layers, seq)
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    table = Table(args.tflops, args.tbs)
    start, parts = time.perf_counter(), args.parts.split(",")
    step_ms, memory, n_params = float("nan"), {}, 0
    if "model" in parts:
        step_ms, memory, n_params = model_parts(cfg, tc, batch, seq, table, args.repeats)
        jax.clear_caches()
    if "moe" in parts:
        moe_pieces(cfg, batch * seq, table, args.repeats)
    if "attention" in parts:
        attention_and_head(cfg, batch, seq, table, args.repeats)
    plan = kernel_plan.resolve(cfg, batch * seq, cached=False)
    tflops = batch * seq * metrics.flops_per_token(cfg, seq) / step_ms / 1e9
    print(
        f"\n{args.layers} layers, D={cfg.embed_dim}, F={cfg.hidden_dim}, batch {batch} x {seq}, "
        f"{n_params / 1e9:.2f} B params; gmm {plan.grouped_matmul.value}, fused_swiglu "
        f"{plan.fused_swiglu}, attention {plan.attention.value}; step {step_ms:.1f} ms = "
        f"{tflops:.0f} TFLOP/s (project count); {time.perf_counter() - start:.0f} s in all"
    )
    table.print(step_ms)
    gb = {k: None if v is None else v / 1e9 for k, v in memory.items()}
    print(
        "(g) train step memory (GB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in gb.items() if v is not None)
    )
    write_json(
        "train_parts.json",
        {
            "env": environment(),
            "config": {"layers": args.layers, "batch": batch, "seq": seq, "small": args.small},
            "fused_swiglu": plan.fused_swiglu,
            "step_ms": step_ms,
            "tflops": tflops,
            "rows": table.rows,
            "memory_bytes": memory,
        },
    )


if __name__ == "__main__":
    main()
