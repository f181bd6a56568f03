"""Scores computed from one forward pass of a classifier's logits (higher = more OOD)."""
import torch

from fastood import ops

from .base import Detector


class LogitDetector(Detector):
    """A detector whose score is a function of the logits ``model(x)`` [B, C]."""

    def _from_logits(self, logits):
        raise NotImplementedError

    def _score_and_predict(self, x):
        logits = self.model(x)
        return self._from_logits(logits.float()), logits.argmax(dim=1)


class MSP(LogitDetector):
    """Maximum softmax probability (Hendrycks & Gimpel): score = ``-max_k softmax(f)_k`` (higher = more OOD)."""

    def _from_logits(self, logits):
        return -torch.softmax(logits, dim=1).amax(dim=1)


class MaxLogit(LogitDetector):
    """Maximum logit: score = ``-max_k f_k`` (higher = more OOD)."""

    def _from_logits(self, logits):
        return -logits.amax(dim=1)


class Energy(LogitDetector):
    """Free energy (Liu et al. 2020): score = ``-T logsumexp(f / T)`` (higher = more OOD)."""

    def __init__(self, model, T: float = 1.0):
        super().__init__(model)
        if not T > 0:
            raise ValueError(f"T must be > 0, got {T}")
        self.T = float(T)

    def _from_logits(self, logits):
        return -self.T * torch.logsumexp(logits / self.T, dim=1)


class Entropy(LogitDetector):
    """Entropy of the softmax: score = ``H(softmax(f))`` (higher = more OOD); uses ``ops.softmax_entropy``."""

    def _from_logits(self, logits):
        return ops.softmax_entropy(logits)


class ExtraClass(LogitDetector):
    """Probability of the (n+1)-th, "outlier" class of an n+1-class classifier: score = ``softmax(f)_{n+1}``
    (higher = more OOD). Predictions ignore the extra class."""

    def _score_and_predict(self, x):
        logits = self.model(x).float()
        return torch.softmax(logits, dim=1)[:, -1], logits[:, :-1].argmax(dim=1)


class Discrepancy(Detector):
    """Two-head discrepancy (Yu & Aizawa 2019): the model returns ``(logits1, logits2)``; score =
    ``sum_k |p1_k - p2_k|`` (higher = more OOD). Predictions from the mean of the two heads' probabilities."""

    def _score_and_predict(self, x):
        out = self.model(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError("Discrepancy needs a model that returns (logits1, logits2), e.g. fastood.models.TwoHead")
        p1, p2 = torch.softmax(out[0].float(), 1), torch.softmax(out[1].float(), 1)
        return (p1 - p2).abs().sum(dim=1), (p1 + p2).argmax(dim=1)


class ICELikelihood(Detector):
    """ICE (Wu et al. 2023): the model returns Gaussian-head values h [B, C] (``h_i <= 0``); score =
    ``-max_i h_i`` (higher = more OOD). ``in_distribution_probability(x) = exp(max_i h_i)``."""

    def _score_and_predict(self, x):
        h = self.model(x).float()
        best, pred = h.max(dim=1)
        return -best, pred

    def in_distribution_probability(self, x):
        return torch.exp(-self.score(x))
