"""ICE's step (Wu et al., AAAI 2023: in-distribution compatible outlier exposure with a Gaussian head) as an
objective."""
import torch

from fastood.losses import ice_loss_terms

from .base import OutlierObjective, check_id_batch, detached, unwrap


def gaussian_head_parameters(model) -> list:
    """The trainable parameters of every :class:`~fastood.models.GaussianHead` in ``model``."""
    from fastood.models import GaussianHead

    return [p for m in unwrap(model).modules() if isinstance(m, GaussianHead) for p in m.parameters()
            if p.requires_grad]


class ICEObjective(OutlierObjective):
    """ICE's loss of one batch: ``loss, logs = ICEObjective(lam=1.0)(model, x, y, x_out)``.

    ``CE(softmax(h(z)), y) + lam * (mean -h_y(z) + mean -log(1 - exp(max_i h_i(z_out))))`` (lam = 1;
    :func:`fastood.losses.ice_loss`, stable near h = 0), where ``model`` outputs the Gaussian head's values
    ``h_i(z) = -||L^-1 (z - m_i)||^2`` [B, C]: a module containing a :class:`~fastood.models.GaussianHead`, e.g.
    ``GaussianClassifier.from_model(classifier)`` with the head initialized from the class features
    (:func:`fastood.trainers.ice.init_gaussian_head`; ``head_scale="median"`` keeps the outlier term active from the
    first step). ID images and outliers go through the model in one forward. :class:`~fastood.trainers.ICETrainer`
    is a loop over this objective.

    Args:
        outliers, outlier_ratio, joint_forward, seed: see :class:`~fastood.objectives.base.OutlierObjective`
            (ICE's paper: outlier batches twice the ID batch, ``outlier_ratio=2``).
        lam: weight of the likelihood terms, >= 0.
        eps: ``max_i h_i(z_out)`` is clamped to <= ``-eps`` in the outlier term.

    Call: ``(model, x, y, x_out=None, grad_share=False)``; ``x_out`` outlier images (None: drawn from
    ``outliers``). Returns ``(loss, logs)``, logs ``loss``, ``ce``, ``id_nll`` (mean ``-h_y``), ``outlier_nll`` (the
    outlier term's mean) and ``acc``; with ``grad_share=True`` also ``outlier_grad_share`` = ``|lam grad outlier
    term| / |grad loss|`` and ``outlier_grad_vs_ce`` = ``|lam grad outlier term| / |grad CE|`` on the GaussianHead's
    parameters (extra ``autograd.grad`` calls through the head only: the mechanism check of the trainer).
    """

    def __init__(self, outliers=None, lam: float = 1.0, eps: float = 1e-6, outlier_ratio: float = 2.0,
                 joint_forward: bool = True, seed: int = 0):
        super().__init__(outliers, outlier_ratio=outlier_ratio, joint_forward=joint_forward, seed=seed)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        if not (isinstance(eps, (int, float)) and 0 < eps < 1):
            raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
        self.lam, self.eps = float(lam), float(eps)

    def __call__(self, model, x, y, x_out=None, grad_share: bool = False):
        check_id_batch(self.owner, x, y)
        h_in, h_out = self.forward_in_out(model, x, self.outliers_for(model, x, y, x_out))
        terms = ice_loss_terms(h_in, y, h_out, self.lam, self.eps)
        terms["acc"] = (h_in.detach().argmax(1) == y).float().mean()
        if grad_share:
            terms.update(self.outlier_gradient_share(model, terms))
        return terms["loss"], detached(terms)

    def outlier_gradient_share(self, model, terms) -> dict:
        """``{"outlier_grad_share", "outlier_grad_vs_ce"}``: the norm of ``lam`` times the outlier term's gradient
        on the GaussianHead parameters of ``model``, over that of the whole loss and of the CE term (floats; the
        graph of ``terms`` -- ``ice_loss_terms``' attached values -- is kept for the training backward)."""
        params = gaussian_head_parameters(model)
        if not params or not terms["outlier_nll"].requires_grad:
            return {}

        def norm(value):
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            return float(torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads if g is not None)
                                    + torch.zeros((), dtype=torch.float64)))

        g_out = self.lam * norm(terms["outlier_nll"])
        g_loss, g_ce = norm(terms["loss"]), norm(terms["ce"])
        return {"outlier_grad_share": g_out / g_loss if g_loss > 0 else 0.0,
                "outlier_grad_vs_ce": g_out / g_ce if g_ce > 0 else float("inf") if g_out > 0 else 0.0}


__all__ = ["ICEObjective"]
