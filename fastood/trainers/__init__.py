"""Trainers: the shared :class:`Trainer` loop and one module per method."""
from .base import MechanismIdleWarning, Trainer
from .checkpoint import CheckpointError, NonFiniteStateError
from .cmg import CMGTrainer
from .cvae import CVAETrainer
from .discrepancy import DiscrepancyTrainer
from .fig import FIGTrainer, GaussianNoiseTrainer
from .ice import ICETrainer
from .manifold import ManifoldTrainer
from .oe import EnergyOETrainer, OETrainer
from .interrupt import TrainingInterrupted
from .outliers import OutlierSource, OutlierTrainer, as_outlier_source
from .resume import ResumeMismatch
from .standard import StandardTrainer

__all__ = [
    "Trainer", "StandardTrainer", "FIGTrainer", "GaussianNoiseTrainer", "CVAETrainer", "ManifoldTrainer",
    "CMGTrainer", "DiscrepancyTrainer", "ICETrainer", "OETrainer", "EnergyOETrainer",
    "OutlierSource", "OutlierTrainer", "as_outlier_source", "MechanismIdleWarning",
    "CheckpointError", "NonFiniteStateError", "ResumeMismatch", "TrainingInterrupted",
]
