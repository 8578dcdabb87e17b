"""Loading for inference: the GPU memory defaults infer.py and the server start with."""

import os


def test_inference_memory_defaults_never_override_the_users_setting(monkeypatch):
    from mixtral_jax.generate import loading

    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    loading.use_inference_memory_defaults()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"  # the user's choice stays
    assert os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] == "cuda_async"
