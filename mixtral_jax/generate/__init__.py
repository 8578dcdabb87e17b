"""Generation: sampling strategies and the cached prefill + decode loop."""

from mixtral_jax.generate.sampler import GenerationResult, Generator
from mixtral_jax.generate.sampling import SamplingParams, sample

__all__ = ["GenerationResult", "Generator", "SamplingParams", "sample"]
