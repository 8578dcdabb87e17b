"""The model: layers, attention, the decoder (`transformer.py`), its KV cache and its params.

Dimension letters are defined in `transformer.py`'s docstring and used everywhere.
"""
