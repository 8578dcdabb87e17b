"""The MoE's pure functions: shared steps (`ops.py`), single-device dispatch (`local.py`) and
expert-parallel dispatch (`expert_parallel.py`), and the local dropless dispatch per device on a
mesh without an expert axis (`data_parallel.py`). The NNX module that wires them as the kernel
plan says is `model/moe.py`.

`ops` is imported by both dispatches; neither dispatch imports the other.
"""
