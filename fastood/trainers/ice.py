"""ICE: in-distribution compatible outlier exposure with a Gaussian head (Wu et al., AAAI 2023)."""
import itertools
import warnings

import torch
from torch import nn

from fastood._stack import user_stacklevel
from fastood.models import GaussianClassifier, GaussianHead
from fastood.objectives.ice import ICEObjective

from .base import ModelReplacedWarning, cosine_schedule, delegated, is_distributed, unwrap
from .outliers import OutlierTrainer


def _has_gaussian_head(model: nn.Module) -> bool:
    return any(isinstance(m, GaussianHead) for m in model.modules())


def init_gaussian_head(model: GaussianClassifier, loader, ridge: float = 0.1, max_batches=None,
                       scale="median") -> GaussianClassifier:
    """Initialize ``model.head`` from the backbone's features (eval mode) on the labeled ``loader`` -- at most
    ``max_batches`` batches: class means and the Cholesky factor of the tied within-class covariance plus
    ``ridge`` times its mean variance on the diagonal, scaled by ``scale`` (default ``"median"``: the median
    training feature at squared Mahalanobis distance 1 from its class mean; see
    :meth:`fastood.models.GaussianHead.init_from_features`). Every class must appear in the data. Returns ``model``."""
    if not isinstance(model, GaussianClassifier):
        raise TypeError(f"model must be a fastood.models.GaussianClassifier, got {type(model).__name__}")
    batches = loader if max_batches is None else itertools.islice(loader, int(max_batches))
    return model.init_from_loader(batches, ridge=ridge, scale=scale)


def _gaussian_heads(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, GaussianHead)]


def _head_initialized_from_features(model: nn.Module) -> bool:
    """Whether a GaussianHead of ``model`` was started from features (``init_from_features`` sets the reference
    factor to a Cholesky factor; a fresh head has the identity)."""
    heads = _gaussian_heads(model)
    return any(not torch.equal(h.reference_tril, torch.eye(h.feat_dim, dtype=h.reference_tril.dtype,
                                                           device=h.reference_tril.device)) for h in heads)


class ICETrainer(OutlierTrainer):
    """ICE training: a backbone with a :class:`~fastood.models.GaussianHead` ``h_i(z) = -||L^-1 (z - m_i)||^2``
    minimizing ``CE(softmax(h(z)), y) + lam * (-h_y(z) - log(1 - exp(max_i h_i(z_out))))`` (lam = 1;
    :func:`fastood.losses.ice_loss`, stable near h = 0). ID images and outliers go through the model in one forward
    pass. A loop over :class:`fastood.objectives.ICEObjective` (``trainer.objective``). Detector: :class:`~fastood.detectors.ICELikelihood` (score ``-max_i h_i``, higher = more OOD;
    ``exp(max_i h_i)`` is the in-distribution probability).

    ``model`` is either
      - a module whose output is ``h`` [B, C] and that contains a GaussianHead (e.g.
        ``GaussianClassifier(backbone, GaussianHead(feat_dim, C))``): trained as it is (from scratch or not); or
      - a trained classifier with a final ``nn.Linear`` (fine-tuning): its head is replaced by a GaussianHead
        (:meth:`GaussianClassifier.from_model`; ``trainer.model`` is then the new GaussianClassifier, sharing the
        classifier's backbone, and the constructor warns once, :class:`~fastood.trainers.base.ModelReplacedWarning`:
        score, evaluate and save ``trainer.model`` or ``trainer.detector()``, since the variable you passed in
        keeps its old ``nn.Linear`` head) which is initialized from the class feature means and the covariance's
        Cholesky factor of the first :meth:`fit` loader's data, before the first step (``init_batches`` batches at
        most; recorded in the checkpoint, not redone on resume). :meth:`from_classifier` does it eagerly.

    Defaults: the paper's fine-tuning recipe -- SGD lr 0.01 (momentum 0.9, wd 5e-4) with cosine decay to 0 over
    the run (``cosine=False``: constant) and an outlier batch twice the ID batch (``outlier_ratio=2``: 128 ID + 256
    outliers in the paper; it applies to samplers; give an outlier DataLoader twice the ID batch size) -- plus
    these choices, measured on the demo's SmallCNN (mnist5k-0to4, ``bench/quality_outliers.py``):
      - ``head_scale="median"``: the head starts from the class means and the tied covariance scaled so that the
        median ID training feature has ``h_y = -1``. With the plain covariance (``head_scale=1``) ``-h_y`` of ID
        features is ~21 (about the feature dimension) and the outliers' ``max_i h_i`` is -530 (median; 95% below
        -44), so the outlier term averaged 2e-14 and carried 8e-14 of the head's gradient: ICE was CE plus a centre
        pull. With ``"median"`` the outlier term is 0.03 at step 0 and carries 9% of the head's gradient norm (46%
        of the CE gradient's). Logged every ``grad_share_every`` steps (see below).
      - ``grad_clip=10``: ``-h_y(z)`` grows with the feature dimension; without clipping (head scale 1) every
        setting tried went to NaN within 3 steps or collapsed to chance accuracy. ``grad_clip=None`` turns it off.
      - ``ridge=0.1``: the covariance is shrunk towards its mean variance (``cov + 0.1 * mean_var * I``) before
        the Cholesky factorization: ReLU features have dead (zero-variance) dimensions.
      - ``freeze_bn=None`` (the default): BatchNorm stays in eval mode when the head was initialized from a trained
        model's features (the statistics the head was fitted on: outliers in the joint batch would otherwise
        shift the ID features' normalization, the "distribution shift" ICE warns about; measured with "blobs"
        outliers, near-OOD AUROC 0.86 in train mode vs 0.97 frozen), and trains normally otherwise (a model
        trained from scratch must learn its BatchNorm statistics). True / False force it.

    Mechanism figures (``history``; the progress bar shows ``loss``, ``ce``, ``outlier_nll``,
    ``outlier_grad_share``): ``outlier_nll`` (the outlier term's mean, every step) and, at step 0 and every
    ``grad_share_every`` steps, ``outlier_grad_share`` = ``|lam grad outlier term| / |grad loss|`` and
    ``outlier_grad_vs_ce`` = ``|lam grad outlier term| / |grad CE|``, gradients taken on the GaussianHead's
    parameters (extra ``autograd.grad`` calls through the head only; skipped under DDP). When every measured
    ``outlier_grad_share`` of an epoch (or a shorter fit) is below 1e-8, the trainer warns once
    (:class:`~fastood.trainers.MechanismIdleWarning`).

    Args:
        model: see above.
        outliers: DataLoader of outlier images, a sampler from :mod:`fastood.samplers`, or an OutlierSource.
        lam: weight of the likelihood terms.
        eps: ``max_i h_i(z_out)`` is clamped to <= ``-eps`` in the outlier term.
        ridge, init_batches, head_scale: Gaussian-head initialization (see :func:`init_gaussian_head`).
        freeze_bn, grad_clip: see above.
        cosine: cosine learning-rate decay over the run (the paper's), applied by :meth:`configure_scheduler`.
        outlier_ratio: outliers per ID image asked of a sampler (paper: 2).
        grad_share_every: steps between two measurements of the outlier term's gradient share (0: never).
        **kwargs: :class:`~fastood.trainers.outliers.OutlierTrainer` / Trainer options.
    """

    default_lr = 0.01
    progress_keys = ("loss", "ce", "outlier_nll", "outlier_grad_share")
    #: below this share of the loss gradient's norm the outlier term counts as idle
    idle_ratio = 1e-8

    lam = delegated("lam")
    eps = delegated("eps")

    def __init__(self, model, outliers=None, lam: float = 1.0, eps: float = 1e-6, ridge: float = 0.1,
                 init_batches=None, freeze_bn=None, grad_clip=10.0, head_scale="median", cosine: bool = True,
                 outlier_ratio: float = 2.0, grad_share_every: int = 10, **kwargs):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.head_initialized = True
        replaced = None
        if not _has_gaussian_head(model):
            try:
                replaced, model = model, GaussianClassifier.from_model(model)
            except TypeError as err:
                raise TypeError("ICETrainer needs a model containing a fastood.models.GaussianHead (output h [B, C]) "
                                f"or a classifier whose final nn.Linear can be replaced by one: {err}") from None
            self.head_initialized = False
        if freeze_bn is not None and not isinstance(freeze_bn, bool):
            raise TypeError(f"freeze_bn must be None (automatic), True or False, got {freeze_bn!r}")
        self.freeze_bn_option = freeze_bn
        super().__init__(model, outliers, freeze_bn=bool(freeze_bn), grad_clip=grad_clip, outlier_ratio=outlier_ratio,
                         **kwargs)
        self._replace_objective(ICEObjective, lam=lam, eps=eps)
        if not (head_scale == "median" or (isinstance(head_scale, (int, float)) and not isinstance(head_scale, bool)
                                           and head_scale > 0)):
            raise ValueError(f"head_scale must be 'median' or a number > 0, got {head_scale!r}")
        if isinstance(grad_share_every, bool) or not isinstance(grad_share_every, int) or grad_share_every < 0:
            raise ValueError(f"grad_share_every must be an int >= 0, got {grad_share_every!r}")
        self.ridge, self.init_batches = float(ridge), init_batches
        self.head_scale, self.cosine, self.grad_share_every = head_scale, bool(cosine), grad_share_every
        self._resolve_freeze_bn()
        if replaced is not None:
            warnings.warn(
                f"ICETrainer replaced the final nn.Linear of the {type(replaced).__name__} you passed by a Gaussian "
                "head: trainer.model is a new GaussianClassifier (sharing your model's backbone) and only it is the "
                "ICE model. Score, evaluate and save trainer.model (or use trainer.detector()); your variable keeps "
                "its old linear head (MSP(model) on it scores that head, not ICE's)",
                ModelReplacedWarning, stacklevel=user_stacklevel())

    def _resolve_freeze_bn(self):
        """``freeze_bn=None``: frozen iff the head was initialized from a trained model's features (now or at
        :meth:`on_fit_start`)."""
        if self.freeze_bn_option is None:
            self.freeze_bn = self.head_initialized and _head_initialized_from_features(unwrap(self.model))

    def configure_scheduler(self, optimizer, total_steps):
        if not self.cosine or total_steps < 1:
            return None
        return cosine_schedule(optimizer, total_steps)

    @classmethod
    def from_classifier(cls, model: nn.Module, loader, outliers=None, ridge: float = 0.1, init_batches=None,
                        **kwargs) -> "ICETrainer":
        """An ICETrainer fine-tuning ``model``'s backbone with a GaussianHead initialized now from ``loader``'s
        labeled features (class means, covariance Cholesky factor)."""
        trainer = cls(model, outliers=outliers, ridge=ridge, init_batches=init_batches, **kwargs)
        trainer.initialize_head(loader)
        return trainer

    def initialize_head(self, loader) -> None:
        """Initialize the GaussianHead from the backbone's features on ``loader`` (a GaussianClassifier only)."""
        model = unwrap(self.model)
        if not isinstance(model, GaussianClassifier):
            raise TypeError(f"initialize_head needs a fastood.models.GaussianClassifier, got {type(model).__name__}")
        init_gaussian_head(model, loader, ridge=self.ridge, max_batches=self.init_batches, scale=self.head_scale)
        self.head_initialized = True
        self._resolve_freeze_bn()

    def on_fit_start(self, loader):
        if not self.head_initialized:
            self.initialize_head(loader)

    def training_step(self, batch):
        share = bool(self.grad_share_every) and self.step % self.grad_share_every == 0 and not is_distributed()
        loss, logs = self.objective(self.net, batch[0], batch[1], grad_share=share)
        return {**logs, "loss": loss}

    def outlier_gradient_share(self, terms) -> dict:
        """``{"outlier_grad_share", "outlier_grad_vs_ce"}`` of ``terms`` (:func:`fastood.losses.ice_loss_terms`'
        attached values) on the model's GaussianHead: :meth:`fastood.objectives.ICEObjective.outlier_gradient_share`."""
        return self.objective.outlier_gradient_share(self.model, terms)

    def mechanism_idle(self, logs):
        """A message when the outlier term's gradient stayed below ``idle_ratio`` of the loss gradient at every
        measured step of ``logs``, else None. (Judged against the whole loss's gradient, which bounds the CE
        gradient's: on a saturated head the CE gradient itself vanishes -- 5e-16 of the loss gradient at covariance
        scale 1 on the demo's SmallCNN -- and a ratio to it says nothing.)"""
        ratios = [h["outlier_grad_share"] for h in logs if "outlier_grad_share" in h]
        if not ratios or self.lam == 0 or max(ratios) >= self.idle_ratio:
            return None
        nll = [h["outlier_nll"] for h in logs if "outlier_nll" in h]
        return (f"the outlier term -log(1 - exp(max_i h_i(z_out))) carried at most {max(ratios):.1e} of the loss "
                f"gradient's norm over {len(ratios)} measured steps (its mean: {sum(nll) / max(len(nll), 1):.1e}): "
                "the outliers' max_i h_i is far below 0, so ICE trains as CE plus a centre pull. Start the head with "
                "head_scale='median' (the default) or a larger covariance scale, or check that the outliers differ "
                "from noise the head already rejects.")

    def extra_state(self):
        state = super().extra_state()
        state["head_initialized"] = self.head_initialized
        return state

    def load_extra_state(self, state):
        super().load_extra_state(state)
        self.head_initialized = bool(state.get("head_initialized", self.head_initialized))
        self._resolve_freeze_bn()

    def detector(self):
        from fastood.detectors import ICELikelihood

        return ICELikelihood(unwrap(self.model))


__all__ = ["ICETrainer", "init_gaussian_head"]
