"""Test set-up: 8 fake CPU devices (for mesh tests) before JAX initialises, float32 matmuls.

XLA:CPU's LLVM back end runs without optimisation (--xla_backend_optimization_level=0): the suite
compiles hundreds of small programs and runs most of them a few times, so LLVM's optimisation
passes cost far more than they save (the suite takes about a third less time). It changes how the
host code is generated, not what the XLA program computes: the HLO passes are the same, and
every comparison here is between two runs on this back end or against a tolerance. Likewise
--xla_cpu_use_fusion_emitters=false: XLA:CPU emits its fusions with the elemental IR emitters
instead of the newer MLIR fusion emitters, which compile much more slowly (tests/serve/
test_engine.py + tests/generate/test_generate.py: 142 -> 52 s of backend compile, 208 -> 114 s
wall). --xla_cpu_collective_call_terminate_timeout_seconds=120: XLA:CPU aborts the process when
a collective's 8 host-platform participants have not all arrived within 40 s (its default),
which a loaded two-core machine can approach; a real deadlock still ends, two minutes later.
Subprocesses (train.py, infer.py) inherit the flags through the environment.

(A persistent compilation cache would save minutes here, but XLA:CPU aborted inside a sharded
train step that loaded a cached executable: left out.)"""

import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_collective_call_terminate_timeout_seconds=120",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

import mixtral_jax as mj


@pytest.hookimpl(optionalhook=True)  # an xdist hook: no error where xdist is not installed
def pytest_xdist_make_scheduler(config, log):
    """`make test`'s `--dist loadscope`, made to survive a crashed worker (`xdist_crash.py`)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist_crash import CrashSafeLoadScope

    return CrashSafeLoadScope(config, log)


@pytest.fixture
def tiny_cfg() -> mj.ModelConfig:
    return mj.ModelConfig.tiny()
