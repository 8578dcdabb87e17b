"""How many passes over the training state the compiled optimizer step makes: read from the
optimized HLO (compiled, not run: nothing is allocated, so the full width compiles on a laptop).

  PYTHONPATH=. python bench/update_passes.py [--layers 2] [--tiny] [--step] [--rows 12]

The 2-layer, full-width Mixtral 8x7B of bench/train_step.py (float32 master weights and AdamW
moments; `--tiny`: the tiny preset), on one device of the default backend (the GPU's fusion
decisions are the ones that count; the CPU's are printed where there is no GPU).

Default: `train.step.guarded_update` alone, jitted with the state donated, as the train step
runs it (grads and loss as arguments), and beside it `select_guard`, the form it replaced (the
update written, checked, then a select between it and the old state), for comparison. Its state-shaped arrays (the shape of a parameter) read
and written are summed per top-level instruction (a fusion is one kernel: what it reads from
and writes to memory) and printed in units of one float32 copy of the parameters ("passes"),
split into outside the `conditional` (the global norm and the guard's predicate) and inside its
branches (the applied update); then the state-shaped selects and copies, the conditionals, and
the costliest instructions. `--step`: the whole train step (batch 4 x 4096) instead, for its
selects, copies and conditionals only (its activations share shapes with some parameters; on
the CPU the tiny step's 4 state-shaped copies, as before this change, are the layer scan's
zero-initialised gradient carries, not the guard's).
"""

from __future__ import annotations

import argparse
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

import mixtral_jax as mj
from mixtral_jax.parallel import sharding
from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import (
    all_finite,
    apply_optimizer,
    global_norm,
    guarded_update,
    init_state,
    make_optimizer,
    make_train_step,
    state_shardings,
)

_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}
_BYTES.update({"s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1})
_ARRAY = re.compile(r"\b(\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_BRANCHES = re.compile(r"(?:branch_computations=\{|true_computation=|false_computation=)([^}]+)")
_CALLED = re.compile(r"to_apply=%?([\w.\-]+)")
_FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast", "conditional", "call"}


def _arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of each array in an HLO shape (a tuple shape lists several)."""
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _ARRAY.findall(shape_text)
        if dt in _BYTES
    ]


def computations(text: str) -> dict[str, tuple[bool, list[str]]]:
    """name -> (is the entry, its instruction lines) of an HLO module's text."""
    out, lines = {}, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            lines = []
            out[head.group(2)] = (bool(head.group(1)), lines)
        elif line.startswith("}"):
            lines = None
        elif lines is not None:
            lines.append(line)
    return out


def state_traffic(text: str, shapes: set[tuple[int, ...]]) -> list[dict]:
    """One row per top-level instruction of the entry computation and of its conditionals'
    branches (and of the computations they `call`) that reads or writes an array of a shape
    in `shapes`: where ("entry" or "branch"), name, opcode, bytes of such arrays read
    (operands) and written (result)."""
    comps = computations(text)
    entry = next(name for name, (is_entry, _) in comps.items() if is_entry)
    todo, rows = [(entry, "entry")], []
    while todo:
        comp, where = todo.pop()
        known: dict[str, str] = {}
        for line in comps[comp][1]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            known[name] = shape
            for called in _BRANCHES.findall(rest) if op == "conditional" else []:
                todo += [(c.strip().lstrip("%"), "branch") for c in called.split(",")]
            if op == "call":  # e.g. the GPU's command buffers: their kernels, where they run
                todo += [(c, where) for c in _CALLED.findall(rest)]
            if op in _FREE:
                continue
            operands = re.findall(r"%([\w.\-]+)", rest.split("), ", 1)[0])

            def state_bytes(s: str) -> int:
                return sum(_BYTES[dt] * math.prod(d) for dt, d in _arrays(s) if d in shapes)

            read = sum(state_bytes(known.get(o, "")) for o in operands)
            row = {"where": where, "name": name, "op": op, "read": read}
            row["written"] = state_bytes(shape)
            if row["read"] or row["written"]:
                rows.append(row)
    return rows


def summarize(text: str, params) -> dict:
    """state_traffic of `text` in passes over `params` (one float32 copy of the tree), with
    counts of state-shaped selects and copies, and of conditionals."""
    leaves = jax.tree.leaves(params)
    shapes = {tuple(x.shape) for x in leaves if math.prod(x.shape) >= 1024}
    tree = 4 * sum(math.prod(x.shape) for x in leaves if tuple(x.shape) in shapes)
    rows = state_traffic(text, shapes)
    out = {"conditionals": len(re.findall(r" conditional\(", text)), "rows": rows, "tree": tree}
    for where in ("entry", "branch"):
        mine = [r for r in rows if r["where"] == where]
        out[f"{where}_read"] = sum(r["read"] for r in mine) / tree
        out[f"{where}_written"] = sum(r["written"] for r in mine) / tree
        out[f"{where}_kernels"] = len(mine)
    wrote = [r for r in rows if r["written"]]
    # a kernel whose root is a select (XLA names fusions after their root): outside the cond,
    # the select form's choice between new and old; in a branch, at most the clip's select
    out["selects"] = sum(("select" in r["op"] or "select" in r["name"]) for r in wrote)
    out["selects_in_branches"] = sum(
        ("select" in r["op"] or "select" in r["name"]) and r["where"] == "branch" for r in wrote
    )
    out["copies"] = sum(r["op"] in ("copy", "copy-start") for r in wrote)
    return out


def model_config(tiny: bool, layers: int) -> mj.ModelConfig:
    kw = {"num_layers": layers, "dtype": "bfloat16", "param_dtype": "float32"}
    if tiny:
        return mj.ModelConfig.tiny(**kw, moe_impl="dropless")
    return mj.preset("mixtral-8x7b", **kw, moe_impl="dropless", max_seq_len=4096)


def select_guard(tx, state, grads, loss):
    """guarded_update's results the way it computed them before (for comparison only): the
    update written, every written leaf checked, then a select between it and the old state."""
    grad_norm = global_norm(grads)
    new_params, new_opt = apply_optimizer(tx, state.params, state.opt_state, grads, grad_norm)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    finite = finite & all_finite(new_params) & all_finite(new_opt)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return keep(new_params, state.params), keep(new_opt, state.opt_state), finite, grad_norm


def guard_hlo(params, tc: TrainConfig, guard=guarded_update) -> str:
    """The optimized HLO of `guard` (guarded_update's signature) on abstract `params`, the
    state donated."""
    tx = make_optimizer(tc, params)
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), params)

    def update(st, grads, loss):
        new_params, new_opt, finite, _ = guard(tx, st, grads, loss)
        return st.replace(params=new_params, opt_state=new_opt), finite

    jitted = jax.jit(update, donate_argnums=(0,))
    return jitted.lower(state, params, jax.ShapeDtypeStruct((), jnp.float32)).compile().as_text()


def step_hlo(cfg: mj.ModelConfig, params, tc: TrainConfig, batch: int, seq: int) -> str:
    """The optimized HLO of the whole train step (make_train_step) on abstract inputs."""
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), params)
    tx = make_optimizer(tc, params)
    shardings = state_shardings(params, tx, mesh)
    step = make_train_step(nnx.graphdef(mj.abstract(cfg)), tx, tc, mesh=mesh, shardings=shardings)
    # make_train_step binds its (empty) frozen input; lower the jitted function inside
    (jitted,) = [c.cell_contents for c in step.__closure__ if hasattr(c.cell_contents, "lower")]
    state = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    rows = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    data = {k: rows for k in ("tokens", "positions", "segment_ids", "targets")}
    data["loss_mask"] = jax.ShapeDtypeStruct((1, batch, seq), jnp.float32)
    return jitted.lower(state, data, {}).compile().as_text()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="the tiny preset (quick on the CPU)")
    p.add_argument("--step", action="store_true", help="the whole train step: selects, copies")
    p.add_argument("--rows", type=int, default=12, help="costliest instructions to list")
    args = p.parse_args()
    cfg = model_config(args.tiny, args.layers)
    params = mj.param_shapes(cfg)
    batch, seq = (2, 64) if args.tiny else (4, 4096)
    tc = TrainConfig(steps=1000, batch_size=batch, seq_len=seq, warmup_steps=10)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    print(f"backend {jax.default_backend()}, {n / 1e9:.3f} B parameters, layers {args.layers}")
    if args.step:
        s = summarize(step_hlo(cfg, params, tc, batch, seq), params)
        print(
            f"train step: {s['conditionals']} conditional(s), state-shaped selects "
            f"{s['selects']}, copies {s['copies']} (the whole step's)"
        )
        return
    for name, guard in (("select_guard (before)", select_guard), ("guarded_update", None)):
        s = summarize(guard_hlo(params, tc, guard or guarded_update), params)
        print(
            f"{name}: {s['conditionals']} conditional(s), state-shaped selects "
            f"{s['selects']} ({s['selects_in_branches']} in branches), copies {s['copies']}"
        )
        for where in ("entry", "branch"):
            print(
                f"  {where:>6}: read {s[f'{where}_read']:.2f} + written "
                f"{s[f'{where}_written']:.2f} passes in {s[f'{where}_kernels']} kernels"
            )
        total = sum(s[f"{w}_{k}"] for w in ("entry", "branch") for k in ("read", "written"))
        print(f"  total {total:.2f} passes; one pass = {s['tree'] / 1e9:.2f} GB")
        for r in sorted(s["rows"], key=lambda r: -(r["read"] + r["written"]))[: args.rows]:
            print(
                f"    {r['where']:>6} {r['op']:<8} read {r['read'] / s['tree']:.2f} written "
                f"{r['written'] / s['tree']:.2f}  {r['name'][:60]}"
            )


if __name__ == "__main__":
    main()
