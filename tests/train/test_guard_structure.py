"""The guarded update's structure: the guard is decided before anything is written, then a
lax.cond applies the update or keeps the state. Checked against the slow obvious form (optax's
own clip_by_global_norm + adamw, the update written, checked, then a select) bit for bit, and
in the compiled HLO: a conditional, no select and no copy of a state-sized buffer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixtral_jax.train.config import TrainConfig
from mixtral_jax.train.step import (
    all_finite,
    clip_by_global_norm,
    guarded_update,
    init_state,
    make_optimizer,
)

# Distinctive shapes: a matrix, the embedding (no decay), a norm scale (no decay).
SHAPES = {
    "layers": {"wq": (40, 72)},
    "embed": {"embedding": (96, 40)},
    "final_norm": {"scale": (40,)},
}


def _tree(seed, scale=1.0):
    leaves, treedef = jax.tree.flatten(SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made = [scale * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, made)


def _select_oracle(tx, state, grads, loss):
    """The slow obvious guard: the update written, its every leaf checked, then a select."""
    norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(norm) & all_finite((new_params, new_opt))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return keep(new_params, state.params), keep(new_opt, state.opt_state), finite, norm


def _jitted(guard, tx):
    def update(state, grads, loss):
        params, opt, finite, norm = guard(tx, state, grads, loss)
        return state.replace(params=params, opt_state=opt), finite, norm

    return jax.jit(update, donate_argnums=(0,))


def _host(tree):
    return jax.tree.map(np.array, tree)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


@pytest.mark.parametrize("norm_given", [False, True])
@pytest.mark.parametrize("scale", [1e-3, 10.0])  # under and over clip_norm
def test_clip_by_global_norm_is_optax_bit_for_bit(scale, norm_given):
    grads = _tree(0, scale)
    ours = clip_by_global_norm(1.0)
    norm = optax.tree.norm(grads) if norm_given else None
    got, state = ours.update(grads, ours.init(grads), grad_norm=norm)
    want, want_state = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    _assert_bitwise_equal(_host(got), _host(want))
    assert state == want_state


def test_kept_and_skipped_steps_equal_the_select_oracle_bit_for_bit():
    """Six steps of AdamW (decay mask, clipping on some steps) from the same state, one with a
    NaN gradient (skipped): the state equals the oracle's after every step, bit for bit, in
    optax's own state layout (checkpoints store it)."""
    tc = TrainConfig(warmup_steps=0, steps=8, lr=1e-2, weight_decay=0.1, clip_norm=3.0)
    params = _tree(1)
    tx = make_optimizer(tc, params)
    ref_tx = make_optimizer(tc, params, clip=optax.clip_by_global_norm)
    ours, oracle = _jitted(guarded_update, tx), _jitted(_select_oracle, ref_tx)
    state = init_state(params, tx, 0)  # both donated: each its own buffers
    ref = init_state(jax.tree.map(jnp.copy, params), ref_tx, 0)
    for i, scale in enumerate([0.1, 5.0, np.nan, 0.3, 20.0, 1.0]):
        grads = _tree(10 + i, scale)
        before = _host(state)
        state, finite, norm = ours(state, grads, jnp.float32(2.0))
        ref, ref_finite, ref_norm = oracle(ref, grads, jnp.float32(2.0))
        assert bool(finite) == bool(ref_finite) == (not np.isnan(scale))
        assert np.array(norm).tobytes() == np.array(ref_norm).tobytes()
        _assert_bitwise_equal(_host(state), _host(ref))
        if not finite:
            _assert_bitwise_equal(_host(state), before)
        else:
            assert not np.array_equal(state.params["layers"]["wq"], before.params["layers"]["wq"])


def test_a_moment_that_overflows_is_rejected_though_the_parameters_stay_finite():
    """An optimizer whose params-shaped moment overflows (g * 1e39 is inf in float32) while its
    update is zero: parameters, loss and gradient norm stay finite. Only the check of the
    moments (each parameter's group in the guard's predicate) rejects this step."""

    def update(grads, state, params=None):
        moment = jax.tree.map(lambda m, g: m + g * jnp.float32(1e39), state, grads)
        return jax.tree.map(jnp.zeros_like, grads), moment

    tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update)
    state = init_state(_tree(2), tx, 0)
    before = _host(state)
    state, finite, norm = _jitted(guarded_update, tx)(state, _tree(4), jnp.float32(1.0))
    assert np.isfinite(float(norm)) and not bool(finite)
    _assert_bitwise_equal(_host(state), before)


STATE_SHAPED = re.compile(r"= f32\[(?:40,72|96,40)\]\S* ([\w\-]+)\((.*)$")


def _entry_lines(hlo: str) -> list[str]:
    entry = re.search(r"^ENTRY .*?^}", hlo, re.MULTILINE | re.DOTALL).group(0)
    return entry.splitlines()[1:-1]


def _state_written_outside_the_cond(hlo: str, state_numbers: set[int]) -> list[str]:
    """Top-level instructions of the entry computation (outside the conditional's branches)
    that write a state-shaped float32 array computed from the state's own buffers (parameters
    or moments: what a written would-be new state reads)."""
    lines = _entry_lines(hlo)
    names = {}
    for line in lines:
        m = re.match(r"\s*%([\w.\-]+) = .* parameter\((\d+)\)", line)
        if m and int(m.group(2)) in state_numbers:
            names[m.group(1)] = int(m.group(2))
    found = []
    for line in lines:
        m = STATE_SHAPED.search(line)
        if m and m.group(1) != "parameter":
            operands = re.findall(r"%([\w.\-]+)", m.group(2).split("), ", 1)[0])
            if any(o in names for o in operands):
                found.append(line.strip()[:120])
    return found


def test_compiled_guard_writes_nothing_before_the_cond_and_copies_nothing():
    """The guard's optimized HLO: one conditional; outside it, nothing state-sized is written
    from the parameters or moments (the predicate's fusions reduce the would-be update, the
    select form wrote it and then selected); no state-sized copy anywhere (the cond's kept
    branch returns the donated buffers as they are)."""
    tc = TrainConfig(warmup_steps=0)
    params = _tree(3)
    tx = make_optimizer(tc, params)
    state = init_state(params, tx, 0)
    n_state = len(jax.tree.leaves(state))
    # parameter numbers of the state's float leaves shaped like a parameter (p, mu, nu)
    numbers = {
        i for i, x in enumerate(jax.tree.leaves(state)) if tuple(x.shape) in {(40, 72), (96, 40)}
    }
    assert len(numbers) == 6
    hlo = _jitted(guarded_update, tx).lower(state, params, jnp.float32(1.0)).compile().as_text()
    assert len(re.findall(r" conditional\(", hlo)) == 1
    assert _state_written_outside_the_cond(hlo, numbers) == []
    assert not [line for line in hlo.splitlines() if STATE_SHAPED.search(line) and " copy(" in line]
    assert len(re.findall(r"\{\d+\}: \(\d+, \{\}", hlo.split("input_output_alias=")[1])) >= n_state
    # the detector finds the select form's written update (so the check above can fail)
    old = _jitted(_select_oracle, tx).lower(state, params, jnp.float32(1.0)).compile().as_text()
    assert len(_state_written_outside_the_cond(old, numbers)) >= 6
