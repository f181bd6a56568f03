"""Two-head discrepancy (Yu & Aizawa, "Unsupervised OOD detection by maximum classifier discrepancy", ICCV 2019)."""
import torch

from .base import Detector


class Discrepancy(Detector):
    """score = ``sum_k |p1_k - p2_k|`` (the L1 distance of the two heads' softmax outputs). Higher = more OOD;
    scores in [0, 2].

    The model returns ``(logits1, logits2)``, each [B, C] (e.g. ``fastood.models.TwoHead``). ``predict_class`` is the
    argmax of the heads' mean probability ``(p1 + p2) / 2``.
    """

    def _score_and_predict(self, x):
        out = self.model(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2
                and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in out) and out[0].shape == out[1].shape):
            got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"{type(out).__name__} of {len(out)}"
            raise TypeError("Discrepancy needs a model that returns (logits1, logits2), two [B, C] tensors, e.g. "
                            f"fastood.models.TwoHead; got {got}")
        p1, p2 = torch.softmax(out[0].float(), dim=1), torch.softmax(out[1].float(), dim=1)
        return (p1 - p2).abs().sum(dim=1), (0.5 * (p1 + p2)).argmax(dim=1)
