"""Where the benches write their results (no jax import: the light scripts use it too)."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def out_dir() -> str:
    """$OUT (the device machine's folder that comes back), or else the repository's git-ignored
    out/ (made if missing): never the working directory, where results got committed by
    mistake."""
    out = os.environ.get("OUT") or os.path.join(ROOT, "out")
    os.makedirs(out, exist_ok=True)
    return out
