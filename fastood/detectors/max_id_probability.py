"""The (n+1)-class classifier's maximum in-distribution class probability (Vernekar et al. 2019, Sec. 4)."""
import torch

from .base import Detector, logits_of


class MaxIDProbability(Detector):
    """score = ``-max_{i<=n} softmax(f)_i`` for a classifier with n + 1 outputs [B, n + 1] whose last output is the
    "outlier" class: the softmax runs over all n + 1 outputs, the maximum over the n ID classes only. Higher = more
    OOD; scores in [-1, 0].

    Vernekar et al. (2019) found this score better than the outlier-class probability
    (:class:`~fastood.detectors.ExtraClass`) on MNIST 0-4. ``predict_class`` is the argmax over the n ID classes.
    """

    def _score_and_predict(self, x):
        logits = logits_of(self.model(x), "MaxIDProbability").float()
        if logits.shape[1] < 2:
            raise ValueError(f"MaxIDProbability needs at least 2 outputs (n >= 1 ID classes + the outlier class), "
                             f"got {logits.shape[1]}")
        best, pred = torch.softmax(logits, dim=1)[:, :-1].max(dim=1)
        return -best, pred
