"""Hugging Face names: `config.json` <-> ModelConfig (`config.py`) and weight keys and layouts
(`weights.py`). The package never imports transformers or torch.
"""
