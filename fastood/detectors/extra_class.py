"""The (n+1)-class classifier's outlier probability (Vernekar et al. 2019; CMG-softmax)."""
import torch

from .base import Detector, logits_of


class ExtraClass(Detector):
    """score = ``softmax(f)_{n+1}``, the probability of the last ("outlier") class of a classifier with n + 1
    outputs [B, n + 1]. Higher = more OOD; scores in [0, 1].

    ``predict_class`` is the argmax over the n ID classes only (the outlier class is ignored).
    """

    def _score_and_predict(self, x):
        logits = logits_of(self.model(x), "ExtraClass").float()
        if logits.shape[1] < 2:
            raise ValueError(f"ExtraClass needs at least 2 outputs (n >= 1 ID classes + the outlier class), "
                             f"got {logits.shape[1]}")
        return torch.softmax(logits, dim=1)[:, -1], logits[:, :-1].argmax(dim=1)
