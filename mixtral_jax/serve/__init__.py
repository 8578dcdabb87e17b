"""Serving: a continuous-batching engine over a paged KV cache (`engine.py`) and its HTTP front."""
