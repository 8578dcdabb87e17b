"""Device mesh, logical-axis rules and parameter shardings (issue 3).

The ONLY place the mesh axis names appear: data, fsdp, expert, tensor. Everything else names
dimensions logically (batch, embed, vocab, heads, kv_heads, mlp, experts, layers, ...) and asks
this module which mesh axes hold them.

A mesh is described by a `MeshConfig` ("data=2,fsdp=1,expert=4,tensor=1"; one axis may be -1 =
the devices that are left). `param_shardings` gives a parameter tree's shardings from its shapes;
this module never builds a model (`model.init_params` creates parameters already sharded: the
initialiser runs under `jax.jit` with these shardings as `out_shardings`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.config import ConfigError

AXES = ("data", "fsdp", "expert", "tensor")

# Logical dimension -> mesh axes (in order) that split it. Batch is split over every axis that
# holds different data; weights are split over fsdp (embed dim) and tensor (heads / mlp / vocab);
# experts over expert. A dimension is only split by the axes whose product divides its size.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp", "expert"),
    "length": (),
    "layers": (),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "experts_logits": (),
    "norm": (),
    "groups": (),  # the K/G axis of a quantized weight's scales: whole on every device
}

# Every parameter leaf (dotted path in get_params's tree) -> logical names of its dimensions.
PARAM_LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed.embedding": ("vocab", "embed"),
    "final_norm.scale": ("norm",),
    "lm_head": ("embed", "vocab"),
    "layers.attn.q_proj": ("layers", "embed", "heads", "head_dim"),
    "layers.attn.k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "layers.attn.v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "layers.attn.o_proj": ("layers", "heads", "head_dim", "embed"),
    "layers.attn_norm.scale": ("layers", "norm"),
    "layers.moe_norm.scale": ("layers", "norm"),
    "layers.moe.router": ("layers", "embed", "experts_logits"),
    "layers.moe.w_gate": ("layers", "experts", "embed", "mlp"),
    "layers.moe.w_up": ("layers", "experts", "embed", "mlp"),
    "layers.moe.w_down": ("layers", "experts", "mlp", "embed"),
}


# Quantized attention projections are stored as 2-D matrices per layer (`model/attention.py`):
# [L, D, heads*H] for q/k/v and [L, heads*H, D] for o, heads*H split like heads.
QUANTIZED_LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "layers.attn.q_proj": ("layers", "embed", "heads"),
    "layers.attn.k_proj": ("layers", "embed", "kv_heads"),
    "layers.attn.v_proj": ("layers", "embed", "kv_heads"),
    "layers.attn.o_proj": ("layers", "heads", "embed"),
}
SCALE_SUFFIX = "_scale"  # the scales of quantized weight W are the leaf W_scale beside it


def param_logical_axes(name: str, rank: int) -> tuple[str, ...]:
    """Logical names of the dimensions of parameter `name` (dotted) of rank `rank`.

    Quantized codes keep their weight's names (int4 halves the contraction axis, which shards
    as before where the mesh divides it); a weight's scales W_scale [..., K/G, N] too, except
    the K/G axis, which is whole ("groups"). Raises ValueError for an unknown parameter.
    """
    base = name.removesuffix(SCALE_SUFFIX)
    if rank == len(QUANTIZED_LOGICAL_AXES.get(base, ())):
        axes = QUANTIZED_LOGICAL_AXES[base]
    elif base in PARAM_LOGICAL_AXES:
        axes = PARAM_LOGICAL_AXES[base]
    else:
        raise ValueError(f"parameter {name} has no logical axes in PARAM_LOGICAL_AXES")
    if base != name:
        axes = (*axes[:-2], "groups", axes[-1])
    return axes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the four mesh axes: the `[mesh]` table of a run config, `--mesh` of the tools.

    Attributes:
      data, fsdp, expert, tensor: axis sizes, each >= 1 or -1 (= the devices that are left; at
        most one axis). All 1 (the default) is a 1x1x1x1 mesh over one device.
    Raises ConfigError (one line naming the axis) for a size that breaks those rules.
    """

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in AXES:
            value = getattr(self, axis)
            if not (value == -1 or value >= 1):
                raise ConfigError(f"mesh.{axis}={value!r}: must be >= 1 or -1")
        free = [a for a in AXES if getattr(self, a) == -1]
        if len(free) > 1:
            raise ConfigError(
                f"mesh.{free[-1]}=-1: only one mesh axis may be -1 "
                f"({' and '.join(free)} are; at most one may be)"
            )

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """Parses "data=2,expert=4" (missing axes are 1). Raises ValueError naming the bad item."""
        sizes = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in AXES:
                raise ValueError(
                    f"mesh item {item!r}: expected one of {', '.join(AXES)} as name=size"
                )
            if name in sizes:
                raise ValueError(f"mesh axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(
                    f"mesh axis {name}={value.strip()!r}: size must be an integer"
                ) from None
        return cls(**sizes)

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; raises ValueError unless they multiply to num_devices."""
        sizes = dataclasses.asdict(self)
        free = [k for k, v in sizes.items() if v == -1]
        fixed = math.prod(v for v in sizes.values() if v != -1)
        if free:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {self}: fixed axes use {fixed} devices, "
                    f"which does not divide the {num_devices} devices"
                )
            sizes[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            raise ValueError(f"mesh {self} uses {fixed} devices, but {num_devices} are present")
        return sizes


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh with axes (data, fsdp, expert, tensor) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolve(len(devices))
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def logical_spec(mesh: Mesh, shape: tuple[int, ...], names: tuple[str, ...]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have logical `names`.

    Uses LOGICAL_RULES, keeping only mesh axes of size > 1 whose product divides the dimension
    (an indivisible dimension stays whole rather than failing); an axis is used at most once.
    """
    if len(shape) != len(names):
        raise ValueError(f"{len(names)} logical names {names} for an array of rank {len(shape)}")
    used: set[str] = set()
    spec = []
    for size, name in zip(shape, names):
        if name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no sharding rule")
        axes = []
        for axis in LOGICAL_RULES[name]:
            n = mesh.shape[axis]
            if (
                n > 1
                and axis not in used
                and size % (math.prod(mesh.shape[a] for a in axes) * n) == 0
            ):
                axes.append(axis)
                used.add(axis)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def param_shardings(shapes: dict, mesh: Mesh) -> dict:
    """NamedShardings for every parameter, as a nested dict shaped like `shapes`.

    shapes: a parameter tree shaped like model.get_params's whose leaves have `.shape` (arrays
    or jax.ShapeDtypeStructs, e.g. model.param_shapes(cfg)).
    """

    def one(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        axes = param_logical_axes(name, len(leaf.shape))
        return NamedSharding(mesh, logical_spec(mesh, leaf.shape, axes))

    return jax.tree_util.tree_map_with_path(one, shapes)


def shard_params(params: dict, mesh: Mesh) -> dict:
    """Places an existing parameter tree on the mesh per the rules table."""
    return jax.device_put(params, param_shardings(params, mesh))


_ACTIVE: list[Mesh] = []


class active:
    """Context manager: models traced inside it run on `mesh`: activations are constrained by
    `constrain`, and MoE layers dispatch over the expert axis when it is > 1 (moe/expert_parallel.py).
    `with sharding.active(mesh): jax.jit(step)(...)`."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def __enter__(self) -> Mesh:
        _ACTIVE.append(self.mesh)
        return self.mesh

    def __exit__(self, *exc):
        _ACTIVE.pop()


def active_mesh() -> Mesh | None:
    """The innermost `active` mesh, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, *logical_names: str) -> jax.Array:
    """`shard` on the active mesh: a no-op outside `active` (one device, inference)."""
    return shard(x, active_mesh(), *logical_names)


def shard(x: jax.Array, mesh: Mesh | None, *logical_names: str) -> jax.Array:
    """Activation sharding constraint: x's dimensions named logically; no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_spec(mesh, x.shape, logical_names))
    )


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of size > 1 that split a batch (LOGICAL_RULES["batch"], in order)."""
    return tuple(a for a in LOGICAL_RULES["batch"] if mesh.shape[a] > 1)


def data_parallel_axes(mesh: Mesh | None) -> tuple[str, ...]:
    """`batch_axes` of a mesh whose expert axis is 1 (data / FSDP), where a Pallas dropless
    MoE runs per device (`moe/data_parallel.py`); () without a mesh or with an expert axis."""
    (expert,) = LOGICAL_RULES["experts"]
    if mesh is None or mesh.shape[expert] > 1:
        return ()
    return batch_axes(mesh)


def batch_sharding(mesh: Mesh, rank: int = 2, leading: int = 0) -> NamedSharding:
    """Sharding of a [B, ...] input batch: B over data, fsdp and expert; with `leading`, that
    many unsplit axes come first ([A, B, T] micro-batches: leading=1)."""
    axes = batch_axes(mesh)
    rows = None if not axes else axes[0] if len(axes) == 1 else axes
    spec = [None] * rank
    spec[leading] = rows
    return NamedSharding(mesh, PartitionSpec(*spec))
