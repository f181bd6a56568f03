"""Relative Mahalanobis distance (Ren, Fort, Liu, Roy, Padhy, Lakshminarayanan, 2021)."""
import torch

from ._feature_hooks import PENULTIMATE, is_logits
from .mahalanobis import Mahalanobis, whitening


class RelativeMahalanobis(Mahalanobis):
    """Relative Mahalanobis distance (Ren et al. 2021, "A simple fix to Mahalanobis distance for improving near-OOD
    detection", Sec. 3): with ``MD_k(z) = (z - mu_k)^T Sigma^+ (z - mu_k)`` (class means, tied within-class
    covariance, as :class:`Mahalanobis`) and ``MD_0(z) = (z - mu_0)^T Sigma_0^+ (z - mu_0)`` for one background
    Gaussian fitted to all training features (mean mu_0, covariance Sigma_0):

        ``RMD_k(z) = MD_k(z) - MD_0(z)``,   score = ``min_k RMD_k(z)``   (higher = more OOD; the paper's
        confidence is ``-min_k RMD_k``).

    Args:
        model: the classifier (its output is used only for ``predict_class``).
        layer: name of the module (``model.named_modules()``) whose output, globally average-pooled, gives the
            features z; default None = the penultimate features (the input of the final linear layer, found as
            :func:`fastood.models.split_head` does; TypeError when there is none).

    ``fit(loader)`` streams labeled ID training data once, keeping per-class feature sums and one second moment
    (float64, around the first batch's mean), from which both covariances follow (Sigma_0 = the total scatter / n,
    Sigma = the within-class scatter / n); memory O(K F + F^2), not growing with the images. Pseudo-inverses
    drop eigenvalues below ``max eig * F * eps``. No hyperparameters. After fitting: ``means`` [1][K, F],
    ``precisions`` [1][F, F], ``background_mean`` [F], ``background_precision`` [F, F].

    References: OpenOOD's ``RMDSPostprocessor`` (float32, sklearn ``EmpiricalCovariance`` inverses) returns
    ``max_k (-RMD_k) = -score``. pytorch-ood 0.4.0's ``RMD`` uses unnormalized scatter matrices plus 1e-6 I and
    an exact inverse in float32: its scores are fastood's divided by n (up to the ridge),
    ``tests/test_detectors_posthoc_b.py`` compares against its recorded outputs.
    """

    hyperparameters = ()

    def __init__(self, model, layer: str = None, **batch_options):
        super().__init__(model, layers=None if layer is None else [layer], epsilon=0.0, **batch_options)
        self.background_mean = self.background_precision = None
        self._background_whiten = None

    @property
    def name(self) -> str:
        default = self.layers == [PENULTIMATE]
        return "RelativeMahalanobis" if default else f"RelativeMahalanobis(layer={self.layers[0]!r})"

    def _check_hyperparameters(self):
        self.epsilon = 0.0

    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "RelativeMahalanobis":
        """Class Gaussians (tied covariance) and the background Gaussian from a labeled ID loader, in one pass."""
        counts, sums, second, shift = self._stream_moments(loader, progress)
        self._fit_gaussians(counts, sums, second, shift)
        n = counts.sum()
        mean0 = sums[0].sum(0) / n                                  # around the shift
        cov0 = (second[0] - n * torch.outer(mean0, mean0)) / n      # total scatter / n
        whiten0 = whitening(cov0, "RelativeMahalanobis.fit: the training features are constant (zero covariance)")
        self.background_mean = mean0 + shift[0]
        self.background_precision = whiten0 @ whiten0.T
        self._background_whiten = whiten0
        return self

    def _score_and_predict(self, x):
        if self.background_mean is None:
            raise RuntimeError("RelativeMahalanobis detector is not fitted: call fit(id_train_loader) first")
        (z,), output = self._features(x)
        class_distance = self._min_distances([z])[0]
        background = ((z - self.background_mean) @ self._background_whiten).pow(2).sum(dim=1)
        return (class_distance - background).float(), output.argmax(dim=1) if is_logits(output) else None
