"""Weight-only int8 / int4 quantization of model checkpoints (`python -m mixtral_jax.quantize`):
streaming conversion (`stream.py`), stored sizes (`inspect`), and its cost in quality
(`quality.py`). The stored format is `kernels/quant.py`'s; the model reads it (`model/quantized.py`)."""

from mixtral_jax.quantize.quality import Quality, evaluate
from mixtral_jax.quantize.stream import inspect_lines, quantize_checkpoint

__all__ = ["Quality", "evaluate", "inspect_lines", "quantize_checkpoint"]
