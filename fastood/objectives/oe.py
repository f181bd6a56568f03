"""Outlier Exposure (Hendrycks et al., ICLR 2019) and energy-bounded OE (Liu et al., NeurIPS 2020) as objectives."""
import math

from fastood.losses import energy_oe_loss_terms, oe_loss_terms

from .base import OutlierObjective, check_id_batch, detached


class OEObjective(OutlierObjective):
    """Outlier Exposure's loss of one batch: ``loss, logs = OEObjective(lam=0.5)(model, x, y, x_out)``.

    ``CE(f(x), y) + lam * mean_out CE(uniform, softmax(f(x_out)))`` (:func:`fastood.losses.oe_loss`, lam = 0.5),
    the ID images and outliers in one forward (``joint_forward``). :class:`~fastood.trainers.OETrainer` is a loop
    over this objective (with the paper's SGD lr 1e-3 and cosine decay).

    Args:
        outliers: optional source of outliers when the call gets none (a DataLoader of outlier images, a sampler, an
            OutlierSource; see :class:`~fastood.objectives.base.OutlierObjective`).
        lam: weight of the outlier term, >= 0.
        outlier_ratio, joint_forward, seed: see :class:`~fastood.objectives.base.OutlierObjective`.

    Call: ``model`` a classifier (logits [B, C]), ``x`` [b, ...] (b >= 1), ``y`` [b], ``x_out`` [m, ...] outlier
    images (m may be 0; None: drawn from ``outliers``). Returns ``(loss, logs)``, logs ``loss``, ``ce``,
    ``outlier`` (mean uniform cross-entropy of the outliers, >= log C), ``outlier_excess`` (``outlier - log C``: 0
    when the model is already uniform on them) and ``acc`` (ID accuracy of the batch).
    """

    def __init__(self, outliers=None, lam: float = 0.5, outlier_ratio: float = 1.0, joint_forward: bool = True,
                 seed: int = 0):
        super().__init__(outliers, outlier_ratio=outlier_ratio, joint_forward=joint_forward, seed=seed)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        self.lam = float(lam)

    def __call__(self, model, x, y, x_out=None):
        check_id_batch(self.owner, x, y)
        logits_in, logits_out = self.forward_in_out(model, x, self.outliers_for(model, x, y, x_out))
        terms = oe_loss_terms(logits_in, y, logits_out, self.lam)
        terms["acc"] = (logits_in.detach().argmax(1) == y).float().mean()
        terms["outlier_excess"] = (terms["outlier"].detach() - math.log(logits_in.shape[1])
                                   if logits_out.shape[0] else logits_in.new_zeros(()))
        return terms["loss"], detached(terms)


class EnergyOEObjective(OutlierObjective):
    """Energy-bounded outlier exposure's loss of one batch:
    ``loss, logs = EnergyOEObjective(m_in=-25, m_out=-7, lam=0.1)(model, x, y, x_out)``.

    ``CE + lam * (mean relu(E_in - m_in)^2 + mean relu(m_out - E_out)^2)``, ``E = -T logsumexp(f / T)``
    (:func:`fastood.losses.energy_oe_loss`; the paper's CIFAR margins -25 / -7, lam = 0.1, T = 1). The margins are
    attributes (``objective.m_in``, ``objective.m_out``) you may set, e.g. from quantiles of the pretrained model's
    energies as :class:`~fastood.trainers.EnergyOETrainer`'s ``margins="auto"`` measures them; that trainer is a
    loop over this objective.

    Args:
        outliers, outlier_ratio, joint_forward, seed: as :class:`OEObjective`.
        m_in, m_out: the energy margins; lam: the regularizer's weight (>= 0); T: the temperature (> 0).

    Call as :class:`OEObjective`. logs: ``loss``, ``ce``, ``margin`` (the squared-hinge term), ``energy_in``,
    ``energy_out`` (mean energies), ``acc``.
    """

    def __init__(self, outliers=None, m_in: float = -25.0, m_out: float = -7.0, lam: float = 0.1, T: float = 1.0,
                 outlier_ratio: float = 1.0, joint_forward: bool = True, seed: int = 0):
        super().__init__(outliers, outlier_ratio=outlier_ratio, joint_forward=joint_forward, seed=seed)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not T > 0:
            raise ValueError(f"T must be a number > 0, got {T!r}")
        self.m_in, self.m_out = float(m_in), float(m_out)
        self.lam, self.T = float(lam), float(T)

    def __call__(self, model, x, y, x_out=None):
        check_id_batch(self.owner, x, y)
        logits_in, logits_out = self.forward_in_out(model, x, self.outliers_for(model, x, y, x_out))
        terms = energy_oe_loss_terms(logits_in, y, logits_out, self.m_in, self.m_out, self.lam, self.T)
        terms["acc"] = (logits_in.detach().argmax(1) == y).float().mean()
        return terms["loss"], detached(terms)


__all__ = ["OEObjective", "EnergyOEObjective"]
