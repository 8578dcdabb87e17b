"""Serving: an OpenAI-compatible HTTP server (app.py, protocol.py, metrics.py; `python -m
mixtral_jax.serve`) over a continuous-batching engine (engine.py)."""
