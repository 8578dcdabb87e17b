"""One optimisation step, compiled: micro-batch gradients, accumulation, clipping, AdamW, guard.

The state is a plain pytree (`TrainState`) and the step is a pure `jax.jit` function with the
state donated, so XLA updates parameters and optimizer moments in place. The model enters as its
`graphdef` and a nested dict of parameters (`model.get_params`), merged at the top of the step.
The step always runs on a mesh (one device is a 1x1x1x1 mesh) and is compiled with explicit
shardings: the state's as given (`state_shardings`), batch rows over the data-holding axes,
metrics replicated; the model is traced inside `sharding.active(mesh)` (activation constraints,
expert-parallel MoE).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from mixtral_jax.config import Exchange, MoEImpl
from mixtral_jax.kernels import grouped_matmul
from mixtral_jax.kernels import plan as kernel_plan
from mixtral_jax.model import quantized
from mixtral_jax.parallel import sharding
from mixtral_jax.train import losses
from mixtral_jax.train.config import TrainConfig


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position.

    Attributes:
      step: [] int32, optimisation steps taken (skipped ones included).
      params: nested dict of parameters (the model's param_dtype, float32 master weights).
      opt_state: optax state.
      rng: [2] uint32 raw PRNG key data (router jitter), split once per step.
      bad_steps: [] int32 consecutive steps skipped (non-finite loss, gradient norm, updated
        parameters or optimizer state).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    bad_steps: jax.Array


def global_norm(tree) -> jax.Array:
    """[] the global (L2) norm of a tree's leaves: optax's."""
    norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
    return norm(tree) if norm is not None else optax.global_norm(tree)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def all_finite(tree) -> jax.Array:
    """[] bool: every floating-point leaf of `tree` holds only finite values."""
    leaves = [x for x in jax.tree.leaves(tree) if _floating(x)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


def _per_parameter(params, opt_state) -> list[list]:
    """The leaves of (params, opt_state) in groups: each parameter with its optimizer moments
    (the subtrees of `opt_state` shaped like `params`: Adam's mu and nu), then every other
    leaf of `opt_state` (counts) alone."""
    treedef = jax.tree.structure(params)
    like = lambda x: jax.tree.structure(x) == treedef
    parts = jax.tree.leaves(opt_state, is_leaf=like)
    groups, others = [], [[x] for x in parts if not like(x)]
    for p, *ms in zip(
        treedef.flatten_up_to(params), *[treedef.flatten_up_to(x) for x in parts if like(x)]
    ):
        groups.append([p] + [m for m in ms if jnp.shape(m) == jnp.shape(p)])
        others += [[m] for m in ms if jnp.shape(m) != jnp.shape(p)]
    return groups + others


def step_is_finite(loss, grad_norm, new_params, new_opt_state) -> jax.Array:
    """[] bool, the guard: the step is kept only if its loss, its gradient norm and everything
    it would write (updated parameters and optimizer state) are finite. An update can overflow
    (a huge learning rate) while loss and gradient are still finite.

    One reduction per parameter over it and its moments (isfinite and-ed elementwise): where
    they are computed inside the reduction (guarded_update), their inputs are read once.
    """
    checks = [jnp.isfinite(loss) & jnp.isfinite(grad_norm)]
    for group in _per_parameter(new_params, new_opt_state):
        finite = [jnp.isfinite(x) for x in group if _floating(x)]
        if finite:
            checks.append(jnp.all(functools.reduce(jnp.logical_and, finite)))
    return jnp.all(jnp.stack(checks))


def decay_mask(params: dict, decay_norms_and_embeddings: bool) -> dict:
    """True for leaves that get weight decay: matrices, but not norm scales or the embedding."""

    def wants_decay(path, leaf):
        names = [getattr(k, "key", str(k)) for k in path]
        if decay_norms_and_embeddings:
            return True
        return not (names[-1] == "scale" or names[:1] == ["embed"])

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to min_lr_ratio * lr at the last step."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.lr,
        warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.lr * tc.min_lr_ratio,
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm, the same state and arithmetic (bit for bit: tested), that takes
    the gradients' global norm as `grad_norm=` when the caller has it: the guarded update
    (guarded_update) computes it once, instead of once more inside the applied update."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        g_norm = global_norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g_norm < max_norm)

        def clip(t):
            return jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(
    tc: TrainConfig, params: dict, clip=clip_by_global_norm
) -> optax.GradientTransformation:
    """Gradient clipping to tc.clip_norm, then AdamW with the schedule and the decay mask.
    `clip` makes the clipping transformation (tests pass optax's own as an oracle)."""
    mask = decay_mask(params, tc.decay_norms_and_embeddings)
    return optax.chain(
        clip(tc.clip_norm),
        optax.adamw(
            learning_rate_schedule(tc),
            b1=tc.b1,
            b2=tc.b2,
            eps=tc.eps,
            weight_decay=tc.weight_decay,
            mask=mask,
        ),
    )


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed + 1)),
        bad_steps=jnp.zeros((), jnp.int32),
    )


def _forward(graphdef, params, mb, rng):
    model = nnx.merge(graphdef, params)
    return model(
        mb["tokens"], positions=mb["positions"], segment_ids=mb["segment_ids"], noise_rng=rng
    )


def _routing_entropy(router_logits, token_mask):
    """[L] mean over real tokens of the router softmax entropy (nats)."""
    logp = jax.nn.log_softmax(router_logits, axis=-1)  # [L, B, T, E]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [L, B, T]
    return jnp.sum(ent * token_mask, axis=(1, 2)) / jnp.maximum(jnp.sum(token_mask), 1.0)


def state_shardings(params, tx: optax.GradientTransformation, mesh) -> TrainState:
    """Shardings of a TrainState on `mesh`: parameters as placed, each optimizer moment like
    its parameter (FSDP shards the moments with the weights), the scalars replicated."""
    shapes = jax.eval_shape(lambda p: init_state(p, tx, 0), params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt = optax.tree_map_params(
        tx,
        lambda _, where: where,
        shapes.opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    return TrainState(
        step=replicated, params=param_shardings, opt_state=opt, rng=replicated, bad_steps=replicated
    )


def _frozen_input(frozen):
    """(join, frozen parameters, their shardings) of a `frozen` pair (see make_train_step)."""
    if frozen is None:
        return (lambda params, _: params), {}, {}
    partition, fixed = frozen
    return partition.join, fixed, jax.tree.map(lambda x: x.sharding, fixed)


def _bind(compiled, fixed):
    """The compiled function with its frozen argument bound (an empty tree when none)."""
    return lambda *args: compiled(*args, fixed)


def make_micro_loss(graphdef, tc: TrainConfig, join=None) -> Callable:
    """The loss of one micro-batch: (params, fixed, mb, rng, total_count) -> (loss, stats).

    loss is this micro-batch's share of the step's `total_loss`: its CE summed over all the
    step's `total_count` tokens, the router terms over the micro-batch count. `join`
    (params, fixed) -> the model's parameters (default: params; see make_train_step).
    """
    join = (lambda params, _: params) if join is None else join
    total_loss = functools.partial(
        losses.total_loss, aux_loss_coef=tc.aux_loss_coef, router_z_loss_coef=tc.router_z_loss_coef
    )

    def micro_loss(params, fixed, mb, rng, total_count):
        out = _forward(graphdef, join(params, fixed), mb, rng)
        nll, count = losses.cross_entropy(out.logits, mb["targets"], mb["loss_mask"])
        aux = out.aux
        router = total_loss(0.0, aux.load_balance_loss, aux.router_z_loss)
        loss = nll / total_count + router / tc.grad_accum
        real = (mb["segment_ids"] > 0).astype(jnp.float32)
        stats = {
            "nll": nll,
            "count": count,
            "load_balance_loss": aux.load_balance_loss,
            "router_z_loss": aux.router_z_loss,
            "tokens_per_expert": aux.layers.tokens_per_expert,  # [L, E]
            "dropped_fraction": aux.layers.dropped_fraction,  # [L]
            "routing_entropy": _routing_entropy(aux.layers.router_logits, real),  # [L]
        }
        return loss, stats

    return micro_loss


def narrowed_names(plan) -> frozenset[str]:
    """The parameter names `cast_named` narrows for a forward computed by `plan`: the
    expert weights where the dropless MoE's grouped matmul is a kernel that writes their
    gradient in the compute dtype (Pallas' or megablox's tgmm), else none.

    Only there is the narrow gradient the old one by construction: the kernel's output is the
    gradient, which the float32 path merely widened. Elsewhere (einsums, ragged_dot, the LM
    head's cast) XLA may drop a round trip through bfloat16 and hand the float32 path a
    gradient that was never rounded (it does so for ragged_dot's experts in the whole model on
    the CPU: 2e-3 relative against the bfloat16 gradient).
    """
    # Under expert parallelism only the ragged exchange runs the grouped matmul (the capacity
    # exchange computes the experts as einsums).
    grouped = plan.expert_mesh is None or plan.exchange != Exchange.CAPACITY
    kernel = grouped_matmul.weight_gradient_in_weight_dtype(plan.grouped_matmul)
    narrow = plan.moe == MoEImpl.DROPLESS and grouped and kernel
    return frozenset(quantized.EXPERTS) if narrow else frozenset()


def cast_named(params, dtype, names: frozenset[str]):
    """`params` with its leaves named in `names` cast down to `dtype` (the others, and leaves
    already no wider than `dtype`, as they are).

    The step differentiates the loss with respect to these casts: the forward computes the
    same values (the model's own cast becomes a no-op), and each such leaf's gradient comes
    back in `dtype`, the very values the model's cast would have widened into a float32
    gradient. Carried narrow (`widen` restores float32 bit for bit inside each consumer), the
    gradients cost half the bytes where XLA must write them out: into the guard's cond.
    """
    dtype = jnp.dtype(dtype)

    def cast(path, x):
        name = getattr(path[-1], "key", str(path[-1]))
        narrower = _floating(x) and jnp.dtype(x.dtype).itemsize > dtype.itemsize
        return x.astype(dtype) if name in names and narrower else x

    return jax.tree_util.tree_map_with_path(cast, params)


def widen(grads, params):
    """`grads` in the dtypes of `params` (float32 gradients of narrow-carried leaves: exact)."""
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def apply_optimizer(tx: optax.GradientTransformation, params, opt_state, grads, grad_norm):
    """(new params, new optimizer state): `tx`'s update, applied. `grad_norm`, the gradients'
    global norm, goes to the transformations that take it (clip_by_global_norm)."""
    tx = optax.with_extra_args_support(tx)
    updates, new_opt = tx.update(grads, opt_state, params, grad_norm=grad_norm)
    return optax.apply_updates(params, updates), new_opt


def _unchanged(params, opt_state, grads, grad_norm):
    del grads, grad_norm
    return params, opt_state


def _apply_widened(tx, params, opt_state, grads, grad_norm):
    return apply_optimizer(tx, params, opt_state, widen(grads, params), grad_norm)


def guarded_update(tx: optax.GradientTransformation, state: TrainState, grads, loss):
    """The step after its gradients: global norm, the optimizer (clipping, AdamW), the guard.

    Returns (params, opt_state, finite, grad_norm): the updated parameters and optimizer
    state where `step_is_finite` holds, else the state's own (the step is skipped).

    The guard is decided before anything is written: `step_is_finite` reduces over the
    would-be new state, which XLA computes inside the reduction's fusion from the gradients,
    moments and parameters and never stores. Then a `lax.cond` either applies the update
    (computed again, written in place of the donated state) or returns the state as it is;
    no select over the whole state and no copy of it (tests/train/test_guard_structure.py).

    `grads` may hold leaves narrower than their parameters (`cast_named`): they are
    widened inside each consumer and enter the cond as they are, so the buffer XLA writes for
    the cond holds them at their own width.
    """
    wide = widen(grads, state.params)
    grad_norm = global_norm(wide)
    finite = step_is_finite(
        loss, grad_norm, *apply_optimizer(tx, state.params, state.opt_state, wide, grad_norm)
    )
    apply = functools.partial(_apply_widened, tx)
    operands = (state.params, state.opt_state, grads, grad_norm)
    params, opt_state = jax.lax.cond(finite, apply, _unchanged, *operands)
    return params, opt_state, finite, grad_norm


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    tc: TrainConfig,
    *,
    mesh,
    shardings: TrainState,
    frozen=None,
    narrow_gradients: bool = True,
) -> Callable:
    """The compiled step: state, batch with a leading [A] micro-batch axis -> state, metrics.

    Compiled for `mesh` (a 1x1x1x1 mesh on one device) with `shardings` (see `state_shardings`)
    as the state's in and out shardings; batch [A, B/A, T] rows split over the data-holding axes.
    `frozen`: (a `trainable.Partition`, the frozen parameters placed on `mesh`) when only part of
    the model trains: the state holds that part, the frozen parameters are a (not donated)
    input joined to it at the top of the forward, so they get no gradient and no moments.
    `narrow_gradients`: differentiate with respect to `cast_named` of the parameters (the
    same step, bit for bit: tests/train/test_narrow_gradients.py); False is that test's oracle.
    """
    join, fixed, fixed_shardings = _frozen_input(frozen)
    total_loss = functools.partial(
        losses.total_loss, aux_loss_coef=tc.aux_loss_coef, router_z_loss_coef=tc.router_z_loss_coef
    )
    grad_fn = jax.value_and_grad(make_micro_loss(graphdef, tc, join), has_aux=True)

    def step(state: TrainState, batch: dict, fixed):
        total_count = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        rngs = jax.random.split(jax.random.wrap_key_data(state.rng), tc.grad_accum + 1)
        params = state.params
        if narrow_gradients:
            cfg = nnx.merge(graphdef, join(params, fixed)).cfg  # static in the graphdef
            tokens = batch["tokens"].shape[1] * batch["tokens"].shape[2]
            plan = kernel_plan.resolve(cfg, tokens, cached=False, mesh=mesh)
            params = cast_named(params, cfg.compute.dtype, narrowed_names(plan))

        def like_params(tree):  # FSDP: gradient accumulators stay sharded like the weights
            return jax.lax.with_sharding_constraint(tree, shardings.params)

        def accumulate(grads, xs):
            mb, rng = xs
            (_, stats), g = grad_fn(params, fixed, mb, rng, total_count)
            return like_params(jax.tree.map(jnp.add, grads, g)), stats

        with sharding.active(mesh):
            if tc.grad_accum == 1:  # no accumulator: a zeroed tree and an add are 2 passes
                one = jax.tree.map(lambda a: a[0], (batch, rngs[1:]))
                (_, stats), grads = grad_fn(params, fixed, one[0], one[1], total_count)
                grads = like_params(grads)
                stats = jax.tree.map(lambda a: a[None], stats)  # as the scan stacks them
            else:
                zeros = like_params(jax.tree.map(jnp.zeros_like, state.params))
                grads, stats = jax.lax.scan(accumulate, zeros, (batch, rngs[1:]))
        ce = jnp.sum(stats["nll"]) / total_count
        lb, z = jnp.mean(stats["load_balance_loss"]), jnp.mean(stats["router_z_loss"])
        loss = total_loss(ce, lb, z)
        new_params, new_opt, finite, grad_norm = guarded_update(tx, state, grads, loss)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            rng=jax.random.key_data(rngs[0]),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        )
        metrics = {
            "loss": loss,
            "ce": ce,
            "load_balance_loss": lb,
            "router_z_loss": z,
            "grad_norm": grad_norm,
            "finite": finite,
            "tokens": total_count,
            "lr": learning_rate_schedule(tc)(state.step),
            "tokens_per_expert": jnp.sum(stats["tokens_per_expert"], axis=0),
            "dropped_fraction": jnp.mean(stats["dropped_fraction"], axis=0),
            "routing_entropy": jnp.mean(stats["routing_entropy"], axis=0),
        }
        return new_state, metrics

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    compiled = jax.jit(
        step,
        in_shardings=(shardings, sharding.batch_sharding(mesh, 3, leading=1), fixed_shardings),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    return _bind(compiled, fixed)


def make_eval_step(graphdef, *, mesh, param_shardings, frozen=None) -> Callable:
    """Compiled held-out evaluation: (params, batch [B, T] arrays) -> (summed NLL, counted
    tokens), for `mesh` with the parameters in `param_shardings` (`frozen`: see
    make_train_step)."""
    join, fixed, fixed_shardings = _frozen_input(frozen)

    def evaluate(params, batch, fixed):
        with sharding.active(mesh):
            out = _forward(graphdef, join(params, fixed), batch, None)
        return losses.cross_entropy(out.logits, batch["targets"], batch["loss_mask"])

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    compiled = jax.jit(
        evaluate,
        in_shardings=(param_shardings, sharding.batch_sharding(mesh, 2), fixed_shardings),
        out_shardings=replicated,
    )
    return _bind(compiled, fixed)


def split_micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, T] arrays -> [A, B/A, T] micro-batches."""

    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch_size={x.shape[0]} is not divisible by grad_accum={grad_accum}")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    return {k: split(v) for k, v in batch.items()}
