"""The computation both sides of tests/test_distributed.py run: tiny-model loss and gradient
norm on a data=4 mesh over `devices`, with the batch fed per process (distributed.global_batch)."""

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from mixtral_jax import distributed
from mixtral_jax import sharding as sh


def loss_and_grad_norm(devices) -> tuple[float, float]:
    cfg = mj.ModelConfig.tiny()
    mesh = sh.make_mesh(sh.MeshConfig(data=4), devices)
    params = sh.init_params(cfg, mesh, seed=5)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    batch = distributed.global_batch(tokens, sh.batch_sharding(mesh))

    def loss_fn(p, t):
        logits = sh.model_from_params(cfg, p)(t).logits
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], axis=-1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    # Replicated scalars: every process reads its own copy.
    return float(loss.addressable_data(0)), float(norm.addressable_data(0))
