"""Outlier generators. Each has ``sample(model, n, shape, context=None) -> [n, *shape]`` and ``stats``."""
from .langevin import LangevinSampler
from .noise import GaussianNoiseSampler, UniformNoiseSampler

__all__ = ["LangevinSampler", "GaussianNoiseSampler", "UniformNoiseSampler"]
