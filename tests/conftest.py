"""Test set-up: 8 fake CPU devices (for mesh tests) before JAX initialises, float32 matmuls.

(A persistent compilation cache would save minutes here, but XLA:CPU aborted inside a sharded
train step that loaded a cached executable: left out.)"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import mixtral_jax as mj  # noqa: E402


@pytest.fixture
def tiny_cfg() -> mj.ModelConfig:
    return mj.ModelConfig.tiny()
