"""The engine tests' model: the tiny model with weights 10x its init (std 0.2), so that greedy
logits are far from ties (a test module with other needs defines its own `model`)."""

import jax
import pytest

import mixtral_jax as mj


@pytest.fixture(scope="module")
def model():
    cfg = mj.ModelConfig.tiny()
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, mj.get_params(mj.init(cfg, 0)))
    return mj.from_params(cfg, params)
