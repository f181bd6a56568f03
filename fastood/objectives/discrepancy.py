"""The two-head discrepancy method's steps (Yu & Aizawa, "Unsupervised out-of-distribution detection by maximum
classifier discrepancy", ICCV 2019) as an objective."""
import math
import warnings

import torch
import torch.nn.functional as F

from fastood._stack import user_stacklevel
from fastood.losses import discrepancy_loss_terms

from .base import OutlierObjective, check_id_batch


def two_logits(out, where: str, owner: str = "DiscrepancyObjective"):
    """``out`` when it is ``(logits1, logits2)``, two [B, C] tensors, else a TypeError naming ``where``."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in out)):
        got = f"{type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise TypeError(f"{owner} needs a model returning (logits1, logits2), two [B, C] tensors, e.g. "
                        f"fastood.models.TwoHead (TwoHead.from_model(classifier)); got {got} on {where}")
    return out


def _accuracy(logits, y):
    return (logits.detach().argmax(1) == y).float().mean()


class DiscrepancyObjective(OutlierObjective):
    """The two-head method's losses of one batch, for a model returning ``(logits1, logits2)``
    (:class:`~fastood.models.TwoHead`):

    - ``loss, logs = objective(model, x, y, x_u)``: step B (Eq. 3), ``CE(f1(x), y) + CE(f2(x), y) + max(m - mean_u
      d(p1(x_u), p2(x_u)), 0)`` with ``d(p1, p2) = H(p1) - H(p2)`` (Eq. 1; the hinge: Eq. 5,
      :func:`fastood.losses.discrepancy_loss`), m = 1.2, ``x_u`` the unlabeled images (None: drawn from
      ``unlabeled``); logs ``loss``, ``ce1``, ``ce2``, ``acc1``, ``acc2``, ``unlabeled`` (the hinge),
      ``entropy_gap`` (mean d), ``margin_reached`` (gap / m), ``phase`` (1).
    - ``loss, logs = objective.supervised(model, x, y)``: the supervised loss of both heads ``CE(f1(x), y) +
      CE(f2(x), y)``: the paper's pre-training (until head 2 classifies as well as head 1) and step A, made before
      each step B. logs ``loss``, ``ce1``, ``ce2``, ``acc1``, ``acc2``, ``phase`` (0).

    :class:`~fastood.trainers.DiscrepancyTrainer` is a loop over these (pre-training, then step A and step B per
    mini-batch). A margin ``m >= log C`` cannot be reached with C classes (``|d| <= log C``): the first call that
    sees C warns.

    Args:
        unlabeled: optional source of unlabeled images (a DataLoader, a sampler, an OutlierSource).
        margin: m (1.2).
        outlier_ratio, joint_forward, seed: see :class:`~fastood.objectives.base.OutlierObjective`.
    """

    def __init__(self, unlabeled=None, margin: float = 1.2, outlier_ratio: float = 1.0, joint_forward: bool = True,
                 seed: int = 0):
        super().__init__(unlabeled, outlier_ratio=outlier_ratio, joint_forward=joint_forward, seed=seed)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ValueError(f"margin must be a finite number, got {margin!r}")
        self.margin = float(margin)
        self._margin_checked = False

    def check_margin(self, num_classes) -> None:
        """Warn once when the margin cannot be reached with ``num_classes`` classes (None: not known yet)."""
        if num_classes is None or self._margin_checked:
            return
        self._margin_checked = True
        if num_classes >= 2 and self.margin >= math.log(num_classes):
            warnings.warn(f"{self.owner}: margin m = {self.margin:g} cannot be reached with {num_classes} "
                          f"classes: the entropy gap H(p1) - H(p2) is at most log({num_classes}) = "
                          f"{math.log(num_classes):.3g}, so the unlabeled loss never reaches 0. Use a margin below "
                          "log(C) (the paper's 1.2 assumes C >= 4)", UserWarning, stacklevel=user_stacklevel())

    def supervised(self, model, x, y):
        """``(loss, logs)`` of the supervised loss of both heads (pre-training and step A)."""
        check_id_batch(self.owner, x, y)
        l1, l2 = two_logits(model(x), "the labeled batch", self.owner)
        self.check_margin(l1.shape[1])
        ce1, ce2 = F.cross_entropy(l1.float(), y), F.cross_entropy(l2.float(), y)
        loss = ce1 + ce2
        return loss, {"loss": loss.detach(), "ce1": ce1.detach(), "ce2": ce2.detach(), "acc1": _accuracy(l1, y),
                      "acc2": _accuracy(l2, y), "phase": 0.0}

    def __call__(self, model, x, y, x_u=None):
        check_id_batch(self.owner, x, y)
        out_in, out_u = self.forward_in_out(model, x, self.outliers_for(model, x, None, x_u))
        l1, l2 = two_logits(out_in, "the labeled batch", self.owner)
        u1, u2 = two_logits(out_u, "the unlabeled batch", self.owner)
        self.check_margin(l1.shape[1])
        ce1, ce2 = F.cross_entropy(l1.float(), y), F.cross_entropy(l2.float(), y)
        unl = discrepancy_loss_terms(u1, u2, self.margin)
        gap = unl["entropy_gap"].detach()
        loss = ce1 + ce2 + unl["loss"]
        return loss, {"loss": loss.detach(), "ce1": ce1.detach(), "ce2": ce2.detach(), "acc1": _accuracy(l1, y),
                      "acc2": _accuracy(l2, y), "unlabeled": unl["loss"].detach(), "entropy_gap": gap,
                      "margin_reached": gap / self.margin if self.margin else float("nan"), "phase": 1.0}


__all__ = ["DiscrepancyObjective", "two_logits"]
