"""Routing analytics: loads, entropy, co-activation, next-token stickiness, plots and a token page.

`python -m mixtral_jax.routing --checkpoint DIR --text FILE --out DIR` writes the report.
"""
