"""The Trainer base of the methods that draw a batch of outliers (or unlabeled images) every step.

Where outliers come from (a loader of auxiliary images or a sampler) is :mod:`fastood.outlier_sources`; its names are
re-exported here.
"""
import torch

from fastood.objectives.base import OutlierObjective
from fastood.outlier_sources import (LoaderOutlierSource, OutlierSource, SamplerOutlierSource,  # noqa: F401
                                     as_outlier_source)

from .base import Trainer, delegated


class OutlierTrainer(Trainer):
    """A :class:`~fastood.trainers.base.Trainer` that draws a batch of outliers (or unlabeled images) every step.

    Args:
        model: the network to train.
        outliers: a DataLoader of images / ``(images, ...)`` tuples, a sampler of :mod:`fastood.samplers`, or an
            :class:`OutlierSource` (see :func:`as_outlier_source`).
        outlier_ratio: outliers per ID image asked of a sampler (and of an ``exact`` loader source):
            ``ceil(outlier_ratio * b)`` for an ID batch of b. A plain loader source returns its own batch size.
        joint_forward: True (default): ID images and outliers go through the model in ONE forward pass of their
            concatenation, so BatchNorm normalizes with (and updates its running statistics from) the mixed batch,
            as the OE / Energy-OE reference code does. False: two forwards.
        freeze_bn: keep every BatchNorm layer in eval mode during training (running statistics fixed, normalizing
            with them; their affine weights are still trained), so outliers in the batch cannot shift the ID
            features' normalization. Default ``False`` (OETrainer, EnergyOETrainer, DiscrepancyTrainer: ``False``;
            ICETrainer: ``None``, automatic, see its docstring).
        **kwargs: the Trainer's (lr, momentum, weight_decay, checkpoint_dir, progress, seed, device, ...).

    The source's position is checkpointed (``extra_state()["outlier_source"]``) and restored on resume. The draw
    and the joint forward are the objective's (:class:`fastood.objectives.base.OutlierObjective`, which each method's
    objective extends); ``outliers``, ``outlier_ratio`` and ``joint_forward`` are its attributes.
    """

    outliers = delegated("outliers", "The outlier source (an :class:`~fastood.outlier_sources.OutlierSource`).")
    outlier_ratio = delegated("outlier_ratio")
    joint_forward = delegated("joint_forward")

    def __init__(self, model, outliers, outlier_ratio: float = 1.0, joint_forward: bool = True,
                 freeze_bn: bool = False, **kwargs):
        super().__init__(model, freeze_bn=freeze_bn, **kwargs)
        if outliers is None:
            raise TypeError(f"{type(self).__name__} needs outliers=: a DataLoader of outlier images or a sampler")
        self.objective = OutlierObjective(outliers, outlier_ratio=outlier_ratio, joint_forward=joint_forward,
                                          seed=self.seed, check_range=False)
        self.objective.owner = type(self).__name__

    def _replace_objective(self, objective_class, **params):
        """Set :attr:`objective` to the method's own ``objective_class(**params)`` around this trainer's source."""
        objective = objective_class(self.outliers, outlier_ratio=self.outlier_ratio, joint_forward=self.joint_forward,
                                    **params)
        objective.owner = type(self).__name__
        self.objective = objective

    def draw_outliers(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Outlier images for the ID batch ``x`` [b, *shape], on the training device in ``x``'s dtype."""
        return self.objective.draw_outliers(self.model, x, y)

    def forward_in_out(self, x_in: torch.Tensor, x_out: torch.Tensor):
        """``(model(x_in), model(x_out))`` from one concatenated forward (``joint_forward``) or two.

        Tensor outputs are split along the batch; a tuple/list output (e.g. :class:`~fastood.models.TwoHead`'s
        ``(logits1, logits2)``) is split item by item.
        """
        return self.objective.forward_in_out(self.net, x_in, x_out)

    def extra_state(self) -> dict:
        return {"outlier_source": self.outliers.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "outlier_source" in state:
            self.outliers.load_state_dict(state["outlier_source"])

