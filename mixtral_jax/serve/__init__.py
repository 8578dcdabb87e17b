"""Serving: a continuous-batching engine over a paged KV cache (`engine.py`) and its HTTP front,
an OpenAI-compatible server (`app.py`, `protocol.py`, `metrics.py`; `python -m mixtral_jax.serve`)."""
