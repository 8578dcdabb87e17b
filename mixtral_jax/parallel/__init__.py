"""Device meshes: the sharding policy (`sharding.py`: the only place mesh axis names appear) and
multi-process start-up and data placement (`distributed.py`).
"""
