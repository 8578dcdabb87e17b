"""Expert surgery: drop experts, merge experts, change top-k; each gives a valid smaller model.

All operations act on our parameter tree (`model.get_params`) and return a new tree plus the
config that describes it, so the result saves as an ordinary checkpoint.

- Dropping keeps a chosen subset of experts per layer (every layer keeps the same number: the
  layers are stacked). The router keeps its columns for the kept experts only, so its softmax and
  top-k renormalisation run over the remaining experts: the router is renormalised over the rest.
- Merging replaces each group of experts by their weighted average (weights, e.g. load shares,
  default equal); the router column of the merged expert is the same weighted average.
- Top-k is a config change (fewer experts per token at inference).

Letters: L layers, E experts (E' after surgery), D embed width, F expert width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixtral_jax.config import ConfigError, ModelConfig

_EXPERT_LEAVES = ("w_gate", "w_up", "w_down")


def _moe(params: dict) -> dict:
    return params["layers"]["moe"]


def _with_moe(params: dict, moe: dict) -> dict:
    layers = dict(params["layers"], moe=moe)
    return dict(params, layers=layers)


def keep_per_layer(cfg: ModelConfig, drop: Sequence[int] | Sequence[Sequence[int]]) -> np.ndarray:
    """[L, E'] experts to keep, from one drop list for all layers or one list per layer.

    Raises:
      ConfigError: an index out of range or repeated, unequal counts per layer, or nothing left.
    """
    per_layer = (
        [list(d) for d in drop]
        if drop and not np.isscalar(drop[0])
        else [list(drop)] * cfg.num_layers
    )
    if len(per_layer) != cfg.num_layers:
        raise ConfigError(f"drop lists for {len(per_layer)} layers, model has {cfg.num_layers}")
    keep = []
    for layer, dropped in enumerate(per_layer):
        bad = [e for e in dropped if not 0 <= int(e) < cfg.num_experts]
        if bad:
            raise ConfigError(f"layer {layer}: expert {bad[0]} out of range [0, {cfg.num_experts})")
        if len(set(dropped)) != len(dropped):
            raise ConfigError(f"layer {layer}: drop list {dropped} repeats an expert")
        keep.append([e for e in range(cfg.num_experts) if e not in set(dropped)])
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise ConfigError(f"every layer must keep the same number of experts, got {sorted(sizes)}")
    (size,) = sizes
    if size == 0:
        raise ConfigError("cannot drop every expert")
    if size < cfg.num_experts_per_tok:
        raise ConfigError(
            f"{size} experts left < top-k {cfg.num_experts_per_tok}: "
            f"also lower top-k (--topk {size})"
        )
    return np.array(keep, np.int64)


def drop_experts(
    params: dict, cfg: ModelConfig, drop: Sequence[int] | Sequence[Sequence[int]]
) -> tuple[dict, ModelConfig]:
    """Removes experts (the same ones in every layer, or per-layer lists of equal length)."""
    keep = keep_per_layer(cfg, drop)  # [L, E']
    layer_index = np.arange(cfg.num_layers)[:, None]
    moe = dict(_moe(params))
    for name in _EXPERT_LEAVES:
        moe[name] = np.asarray(moe[name])[layer_index, keep]  # [L, E', ...]
    router = np.asarray(moe["router"])  # [L, D, E]
    moe["router"] = np.take_along_axis(router, keep[:, None, :], axis=2)  # [L, D, E']
    return _with_moe(params, moe), cfg.replace(num_experts=keep.shape[1])


def least_used(load_share: np.ndarray, count: int) -> list[list[int]]:
    """Per layer, the `count` experts with the smallest load share ([L, E] from a report)."""
    order = np.argsort(np.asarray(load_share), axis=1, kind="stable")
    return [sorted(int(e) for e in row[:count]) for row in order]


def merge_experts(
    params: dict,
    cfg: ModelConfig,
    groups: Sequence[Sequence[int]],
    weights: Sequence[float] | None = None,
) -> tuple[dict, ModelConfig]:
    """Replaces each group of experts by its weighted average, in every layer.

    Experts in no group stay as they are. The merged model's experts are ordered by the smallest
    index of each group (singletons included).

    Args:
      groups: disjoint lists of expert indices, e.g. [[0, 3], [1, 2]].
      weights: [E] non-negative weights per expert (e.g. load shares); default equal.
    """
    e_total = cfg.num_experts
    seen: set[int] = set()
    for group in groups:
        for e in group:
            if not 0 <= e < e_total:
                raise ConfigError(
                    f"merge group {list(group)}: expert {e} out of range [0, {e_total})"
                )
            if e in seen:
                raise ConfigError(f"expert {e} appears in two merge groups")
            seen.add(e)
    w = np.ones(e_total) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (e_total,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"merge weights must be {e_total} finite values >= 0")
    all_groups = [list(g) for g in groups if g] + [[e] for e in range(e_total) if e not in seen]
    all_groups.sort(key=min)
    for group in all_groups:
        if w[group].sum() <= 0:
            raise ConfigError(f"merge group {group} has zero total weight")
    if len(all_groups) < cfg.num_experts_per_tok:
        raise ConfigError(
            f"{len(all_groups)} experts left < top-k {cfg.num_experts_per_tok}: also lower top-k"
        )

    def average(leaf: np.ndarray, axis: int) -> np.ndarray:
        parts = []
        for group in all_groups:
            gw = (w[group] / w[group].sum()).astype(np.float64)
            stacked = np.take(leaf, group, axis=axis).astype(np.float64)
            shape = [1] * leaf.ndim
            shape[axis] = len(group)
            parts.append(np.sum(stacked * gw.reshape(shape), axis=axis).astype(leaf.dtype))
        return np.stack(parts, axis=axis)

    moe = dict(_moe(params))
    for name in _EXPERT_LEAVES:
        moe[name] = average(np.asarray(moe[name]), axis=1)  # [L, E', ...]
    moe["router"] = average(np.asarray(moe["router"]), axis=2)  # [L, D, E']
    return _with_moe(params, moe), cfg.replace(num_experts=len(all_groups))


def set_topk(cfg: ModelConfig, topk: int) -> ModelConfig:
    """The config with `topk` experts per token (validated against num_experts)."""
    return cfg.replace(num_experts_per_tok=topk)
