"""ICE's likelihood score (Wu et al., "In-distribution compatible outlier exposure", AAAI 2023)."""
import torch

from .base import Detector, logits_of


class ICELikelihood(Detector):
    """score = ``-max_i h_i(z)`` for a model whose output is the Gaussian-head values
    ``h_i(z) = -||L^-1 (z - m_i)||^2`` [B, C] (all <= 0; e.g. ``fastood.models.GaussianClassifier``).
    Higher = more OOD; scores >= 0.

    ``exp(max_i h_i)`` is ICE's in-distribution probability (:meth:`in_distribution_probability`);
    ``predict_class`` is ``argmax_i h_i``.
    """

    def _score_and_predict(self, x):
        h = logits_of(self.model(x), "ICELikelihood").float()
        best, predicted = h.max(dim=1)
        return -best, predicted

    def in_distribution_probability(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(max_i h_i)`` [B] in [0, 1] (for h <= 0), on the model's device."""
        return torch.exp(-self.score(x))
