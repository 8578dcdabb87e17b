"""Compute kernels and the one place they are chosen (`plan.py`).

`plan.py` resolves a `KernelPlan` per compiled call; `grouped_matmul.py` is the dropless MoE's
entry point (Pallas `gmm_pallas.py`, TPU `gmm_megablox.py` or ragged_dot); `expert_decode.py`
and `decode_matmul.py` are the few-token decode kernels; `common.py` holds what they share.
Quantized weights (`quant.py`: the int8 / int4 format and its dequantize oracle) are read inside
the same kernels through `weight_tiles.py`; `gmm_quant.py` is the quantized grouped matmul
(prefill).
"""
