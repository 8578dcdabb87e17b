"""Memory planning (issue 3): per-device bytes for params, optimizer state and activations of one
training step on a mesh, from the compiled program's memory_analysis (nothing is allocated).

  python -m mixtral_jax.plan --preset mixtral-8x7b --mesh data=1,fsdp=4,expert=2 --batch 8 --seq 4096

The step compiled is forward + gradient + an Adam-style update (two float32 moments per param),
with params and moments sharded by sharding.py's rules table and donated. Needs as many devices
as the mesh (fake CPU devices are fine: XLA_FLAGS=--xla_force_host_platform_device_count=N).

With quantized weights (`--expert-bits 8|4`, `--attention-bits`, `--group-size`: inference only,
nothing to train) it prints the weights' bytes per device: codes and scales as stored.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import jax.numpy as jnp

from mixtral_jax import config as config_lib
from mixtral_jax.model import params as model_lib
from mixtral_jax.parallel import sharding as sh


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes. params/optimizer from the sharding table; the rest from XLA."""

    params: int
    optimizer: int
    compiled_arguments: int
    compiled_outputs: int
    compiled_temp: int  # activations and other scratch of the step

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / 2**30:10.3f} GiB"
        return [
            f"params      {gib(self.params)}",
            f"optimizer   {gib(self.optimizer)}",
            f"activations {gib(self.compiled_temp)}  (XLA temp)",
            f"arguments   {gib(self.compiled_arguments)}  (XLA)",
            f"total       {gib(self.compiled_arguments + self.compiled_temp)}",
        ]


def per_device_bytes(shapes: dict, shardings: dict, itemsize: int | None = None) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs under the given shardings."""
    total = 0
    for s, shd in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        local = shd.shard_shape(s.shape)
        total += math.prod(local) * (itemsize or jnp.dtype(s.dtype).itemsize)
    return total


def weights_per_device(cfg: config_lib.ModelConfig, mesh_cfg: sh.MeshConfig, devices=None) -> int:
    """Bytes of the model's weights on one device, as stored (int8 / int4 codes and their scales
    for a quantized config) and sharded by the rules table."""
    mesh = sh.make_mesh(mesh_cfg, devices)
    shapes = model_lib.param_shapes(cfg)
    return per_device_bytes(shapes, sh.param_shardings(shapes, mesh))


def plan(
    cfg: config_lib.ModelConfig, mesh_cfg: sh.MeshConfig, batch: int, seq: int, devices=None
) -> Plan:
    """Compiles (does not run) a training step on the mesh and reads its memory analysis."""
    mesh = sh.make_mesh(mesh_cfg, devices)
    shapes = model_lib.param_shapes(cfg)
    pshard = sh.param_shardings(shapes, mesh)
    moments = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

    def step(params, m, v, tokens):
        def loss(p):
            out = model_lib.from_params(cfg, p)(tokens)
            logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

        grads = jax.grad(loss)(params)
        m = jax.tree_util.tree_map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
        v = jax.tree_util.tree_map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
        params = jax.tree_util.tree_map(
            lambda p, a, b: (p - 1e-4 * a / (jnp.sqrt(b) + 1e-8)).astype(p.dtype), params, m, v
        )
        return params, m, v

    with sh.active(mesh):
        compiled = (
            jax.jit(
                step,
                in_shardings=(pshard, pshard, pshard, sh.batch_sharding(mesh)),
                out_shardings=(pshard, pshard, pshard),
                donate_argnums=(0, 1, 2),
            )
            .lower(shapes, moments, moments, tokens)
            .compile()
        )
    mem = compiled.memory_analysis()
    return Plan(
        params=per_device_bytes(shapes, pshard),
        optimizer=2 * per_device_bytes(moments, pshard),
        compiled_arguments=int(mem.argument_size_in_bytes),
        compiled_outputs=int(mem.output_size_in_bytes),
        compiled_temp=int(mem.temp_size_in_bytes),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mixtral_jax.plan", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--preset", default="tiny", choices=sorted(config_lib.PRESETS))
    ap.add_argument("--mesh", default="data=-1")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--expert-bits", type=int, default=16, help="16, 8 or 4 (inference)")
    ap.add_argument("--attention-bits", type=int, default=16, help="16, 8 or 4 (inference)")
    ap.add_argument("--group-size", type=int, help="rows per scale (default: per channel)")
    args = ap.parse_args(argv)
    try:
        if args.batch < 1 or args.seq < 2:
            raise ValueError(f"--batch {args.batch} / --seq {args.seq}: need batch >= 1, seq >= 2")
        cfg = config_lib.preset(
            args.preset,
            expert_bits=args.expert_bits,
            attention_bits=args.attention_bits,
            quant_group_size=args.group_size,
        )
        if cfg.quantized:
            weights = weights_per_device(cfg, sh.MeshConfig.parse(args.mesh))
            print(f"params      {weights / 2**30:10.3f} GiB  (quantized: inference only)")
            return 0
        result = plan(cfg, sh.MeshConfig.parse(args.mesh), args.batch, args.seq)
    except (ValueError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
