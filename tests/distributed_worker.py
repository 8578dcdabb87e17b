"""One process of tests/test_distributed.py's two-process run (not a test module itself).

  python tests/distributed_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID

Starts JAX's multi-process runtime through mixtral_jax.distributed, builds a data=4 mesh over
both processes' devices, feeds each process's rows of one global batch, and prints (process 0)
the loss and gradient norm of the tiny model as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

from mixtral_jax import distributed  # noqa: E402


def main():
    coordinator, count, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert distributed.initialize(coordinator, count, pid)
    from tests.distributed_reference import loss_and_grad_norm

    loss, norm = loss_and_grad_norm(jax.devices())
    if distributed.is_main():
        print(json.dumps({"loss": loss, "grad_norm": norm, "devices": jax.device_count(),
                          "local": jax.local_device_count()}))


if __name__ == "__main__":
    main()
