"""Test set-up: 8 fake CPU devices (for mesh tests) before JAX initialises, float32 matmuls,
a session-wide compilation cache."""

import atexit
import os
import shutil
import tempfile

# One compilation cache for the session (this process and the train.py / CLI subprocesses the
# tests start): the many small runs compile the same programs again and again.
_CACHE = tempfile.mkdtemp(prefix="mixtral-jax-test-cache-")
atexit.register(shutil.rmtree, _CACHE, True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import mixtral_jax as mj  # noqa: E402


@pytest.fixture
def tiny_cfg() -> mj.ModelConfig:
    return mj.ModelConfig.tiny()
