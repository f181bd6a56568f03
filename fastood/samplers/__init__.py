"""Outlier generators. Each has ``sample(model, n, shape, context=None) -> [n, *shape]`` and ``stats``."""
from .class_mix import ClassMixSampler
from .langevin import LangevinSampler
from .manifold import ManifoldSampler
from .noise import GaussianNoiseSampler, UniformNoiseSampler

__all__ = ["LangevinSampler", "GaussianNoiseSampler", "UniformNoiseSampler", "ManifoldSampler", "ClassMixSampler"]
