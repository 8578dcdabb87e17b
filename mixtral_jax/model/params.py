"""Models from configs and weights: random init, abstract shapes, and one way to build a model
from given weights (`from_params`, no random draw).

Parameters travel as a plain nested dict (`get_params`), our checkpoint tree. The sharding policy
(`parallel/sharding.py`) never builds a model: it maps this tree's shapes to shardings, and
`init_params` creates parameters already placed by them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.model.transformer import Mixtral
from mixtral_jax.parallel import sharding


def init(cfg: ModelConfig, seed: int = 0) -> Mixtral:
    """A randomly initialised model (N(0, initializer_range^2) matrices, unit norm scales)."""
    return Mixtral(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: ModelConfig) -> Mixtral:
    """The model with jax.ShapeDtypeStruct leaves: shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: Mixtral(cfg, rngs=nnx.Rngs(0)))


def param_shapes(cfg: ModelConfig) -> dict:
    """`get_params`'s tree of jax.ShapeDtypeStruct leaves (param dtype): what a model holds."""
    return get_params(abstract(cfg))


def from_params(cfg: ModelConfig, params: dict) -> Mixtral:
    """The model whose parameters are `params` (shaped like `get_params`'s), drawing nothing.

    Built from `abstract(cfg)`'s structure with the given leaves cast to cfg.param_dtype (a leaf
    already of that dtype is used as it is). Usable inside jax.jit; leaves keep their shardings.

    Raises:
      ValueError: a leaf is missing, unexpected, or of the wrong shape (named, one line).
    """
    graphdef, state = nnx.split(abstract(cfg))
    nnx.replace_by_pure_dict(state, _checked_params(nnx.to_pure_dict(state), params))
    return nnx.merge(graphdef, state)


def init_params(cfg: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0) -> dict:
    """Random parameters (same values as init(cfg, seed)) created directly sharded on `mesh` by
    the rules table (sharding.param_shardings): no device ever holds a full copy."""
    shardings = sharding.param_shardings(param_shapes(cfg), mesh)
    return jax.jit(lambda: get_params(init(cfg, seed)), out_shardings=shardings)()


def get_params(model: Mixtral) -> dict:
    """The model's parameters as a plain nested dict of arrays (our checkpoint tree)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model: Mixtral, params: dict) -> None:
    """Overwrites the model's parameters from a nested dict shaped like `get_params`'s.

    Raises:
      ValueError: a leaf is missing, unexpected, or of the wrong shape (named, one line).
    """
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, _checked_params(nnx.to_pure_dict(state), params))
    nnx.update(model, state)


def _checked_params(expected: dict, params: dict) -> dict:
    """`params` cast to `expected`'s dtypes after checking it has exactly `expected`'s leaves
    and shapes; raises ValueError naming the first leaf that is missing, misshapen or extra."""
    expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in expected:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if path not in given:
            raise ValueError(f"parameter {name} missing")
        if tuple(given[path].shape) != tuple(leaf.shape):
            raise ValueError(
                f"parameter {name} has shape {tuple(given[path].shape)}, "
                f"expected {tuple(leaf.shape)}"
            )
    if len(given) != len(expected):
        extra = sorted(set(given) - {p for p, _ in expected})
        name = jax.tree_util.keystr(extra[0], simple=True, separator=".")
        raise ValueError(f"unexpected parameter {name}")
    dtypes = {path: leaf.dtype for path, leaf in expected}
    return jax.tree_util.tree_map_with_path(lambda p, x: jnp.asarray(x, dtypes[p]), params)
