"""Each method as a piece for your own training loop: one object per method that computes one step's loss and logs
from a batch, which the trainers of :mod:`fastood.trainers` loop over.

    fig = FIGObjective(LangevinSampler(), k=0.1, lam=1.0)
    with fastood.frozen_batchnorm(model):             # FIG fine-tunes with BatchNorm frozen
        loss, logs = fig(model, x, y)                 # loss: a scalar to backward; logs: detached scalars
    loss.backward(); optimizer.step(); optimizer.zero_grad()

- :class:`FIGObjective` ``(model, x, y)``: FIG, samples from the model being trained (``FIGTrainer``)
- :class:`GaussianNoiseObjective` ``(model, x, y)``: GS, FIG's Gaussian-noise baseline (``GaussianNoiseTrainer``)
- :class:`OEObjective` ``(model, x, y, x_out)``: Outlier Exposure (``OETrainer``)
- :class:`EnergyOEObjective` ``(model, x, y, x_out)``: energy-bounded OE (``EnergyOETrainer``)
- :class:`ICEObjective` ``(model, x, y, x_out)``: ICE, a model with a Gaussian head (``ICETrainer``)
- :class:`ManifoldObjective` ``(model, x, y)``: the n+1 classifier on a CVAE's manifold outliers (``ManifoldTrainer``)
- :class:`CMGObjective` ``(head, f_id, y, f_ood)``: CMG stage 2 on features (``CMGTrainer``)
- :class:`DiscrepancyObjective` ``(model, x, y, x_u)`` and ``.supervised(model, x, y)``: two heads
  (``DiscrepancyTrainer``)

Every call returns ``(loss, logs)``: ``loss`` a differentiable scalar, ``logs`` a dict of detached scalars with
``"loss"`` among them. Objectives never step an optimizer or change the model's train/eval mode; the loop does
(:func:`fastood.frozen_batchnorm` for BatchNorm). The outlier objectives take their outliers per call, or draw
them from ``outliers=`` (a DataLoader, a sampler or an OutlierSource) when the call gives none. The losses they
are made of are in :mod:`fastood.losses`.
"""
from .base import Objective, OutlierObjective
from .cmg import CMGObjective
from .discrepancy import DiscrepancyObjective
from .fig import FIGObjective, GaussianNoiseObjective
from .ice import ICEObjective
from .manifold import ManifoldObjective
from .oe import EnergyOEObjective, OEObjective

__all__ = ["Objective", "OutlierObjective", "FIGObjective", "GaussianNoiseObjective", "OEObjective",
           "EnergyOEObjective", "ICEObjective", "ManifoldObjective", "CMGObjective", "DiscrepancyObjective"]
