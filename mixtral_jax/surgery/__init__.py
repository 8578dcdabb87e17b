"""Expert surgery: drop experts, merge experts, change top-k; each gives a valid smaller model.

  python -m mixtral_jax.surgery {drop,merge,topk,eval} ...   (see `mixtral_jax.surgery.cli`)

Modules: `ops` (the operations on our parameter tree), `cli` (the commands).
"""

from mixtral_jax.surgery.ops import (
    drop_experts,
    keep_per_layer,
    least_used,
    merge_experts,
    set_topk,
)

__all__ = ["drop_experts", "keep_per_layer", "least_used", "merge_experts", "set_topk"]
