"""Trainers: the shared :class:`Trainer` loop and one module per method."""
from .base import Trainer
from .fig import FIGTrainer, GaussianNoiseTrainer
from .standard import StandardTrainer

__all__ = ["Trainer", "StandardTrainer", "FIGTrainer", "GaussianNoiseTrainer"]
