"""Scores from one forward pass of a classifier's logits f = model(x) [B, C]. Higher = more OOD."""
import torch

from fastood import ops

from .base import Detector, logits_of


class LogitDetector(Detector):
    """A detector whose score is a function of the logits [B, C]; predictions are ``argmax_k f_k``."""

    def _from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _score_and_predict(self, x):
        logits = logits_of(self.model(x), type(self).__name__).float()
        return self._from_logits(logits), logits.argmax(dim=1)


class MSP(LogitDetector):
    """Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017): score = ``-max_k softmax(f)_k``.

    Higher = more OOD; scores lie in [-1, -1/C].
    """

    def _from_logits(self, logits):
        return -torch.softmax(logits, dim=1).amax(dim=1)


class MaxLogit(LogitDetector):
    """Maximum logit (Hendrycks et al. 2022): score = ``-max_k f_k``. Higher = more OOD."""

    def _from_logits(self, logits):
        return -logits.amax(dim=1)


class Energy(LogitDetector):
    """Free energy (Liu et al., NeurIPS 2020, Eq. 1): score = ``E(x) = -T logsumexp_k(f_k / T)``.

    Higher = more OOD (ID inputs get large logits, hence low energy). ``T`` > 0 is the temperature (default 1).
    """

    hyperparameters = ("T",)

    def __init__(self, model, T: float = 1.0):
        super().__init__(model)
        self.T = T
        self._check_hyperparameters()

    def _check_hyperparameters(self):
        if not (isinstance(self.T, (int, float)) and self.T > 0):
            raise ValueError(f"T must be a number > 0, got {self.T!r}")
        self.T = float(self.T)

    def _from_logits(self, logits):
        return -self.T * torch.logsumexp(logits / self.T, dim=1)


class Entropy(LogitDetector):
    """Entropy of the softmax: score = ``H(p) = -sum_k p_k log p_k``, p = softmax(f). Higher = more OOD.

    Uses the fused ``fastood.ops.softmax_entropy``.
    """

    def _from_logits(self, logits):
        return ops.softmax_entropy(logits)
