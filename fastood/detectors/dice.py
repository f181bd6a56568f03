"""DICE (Sun & Li, ECCV 2022): directed sparsification of the last linear layer, then the energy score."""
import torch

from ._feature_hooks import final_linear, linear_input
from .base import Detector, eval_mode


def linear_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (0 <= q <= 1) of a 1-d tensor with linear interpolation between order statistics, as
    ``np.percentile(values, 100 q)`` and ``torch.quantile`` (which refuses inputs above 2^24 elements)."""
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


class DICE(Detector):
    """DIrected Sparsification (Sun & Li, ECCV 2022, Sec. 3). With penultimate features h(x) [B, N], the final
    layer ``f = W h + b`` (W [C, N]) and the mean feature ``h_bar`` [N] over the ID training data, the contribution
    matrix ``V = h_bar[None, :] * W`` [C, N] ranks the weights; DICE keeps the weights whose contribution is above
    the p-th quantile of V's C*N entries, ``M = 1[V > quantile_p(V)]``, and scores the sparsified logits:

        ``f_DICE(x) = (M * W) h(x) + b``,   score = ``-logsumexp_k f_DICE(x)_k``   (higher = more OOD).

    Args:
        model: a classifier whose logits are ``head(h)`` of a final ``nn.Linear``.
        p: sparsity, the fraction of weights dropped, 0 <= p < 1. Default 0.9, the paper's CIFAR setting (its
            ImageNet runs use p = 0.7). Grid for :func:`fastood.detectors.tune_detector`: :attr:`grid`.
        head: name of the final ``nn.Linear`` (default: found as :func:`fastood.models.split_head` does).

    ``fit(loader)`` streams ID training images once (labels unused), keeping only the float64 feature sum [N].
    The mask is recomputed from ``mean_activation`` when ``p`` changes, so ``det.replace(p=...)`` needs no refit.
    The quantile interpolates linearly between order statistics and the test is strict (``>``), as OpenOOD's
    ``np.percentile`` and pytorch-ood's ``torch.quantile``: with no ties, ``C N - 1 - floor(p (C N - 1))``
    weights survive. Logits are computed in float64 from the hooked features. ``predict_class`` is the
    sparsified layer's argmax (the network whose ID accuracy the paper reports).
    """

    hyperparameters = ("p",)
    #: a tuning grid (OpenOOD's sweep, plus 0.95).
    grid = {"p": [0.1, 0.3, 0.5, 0.7, 0.9, 0.95]}

    def __init__(self, model, p: float = 0.9, head: str = None, **batch_options):
        super().__init__(model, **batch_options)
        self.p = p
        self._check_hyperparameters()
        self._head_name, self.head = final_linear(model, "DICE", head)
        self.mean_activation = None   # [N] float64
        self._mask_cache = None       # (p, masked weight [C, N] float64)

    def _check_hyperparameters(self):
        if isinstance(self.p, bool) or not (isinstance(self.p, (int, float)) and 0 <= self.p < 1):
            raise ValueError(f"p must be a number in [0, 1) (the fraction of weights dropped), got {self.p!r}")
        self.p = float(self.p)

    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "DICE":
        """The mean penultimate feature over ID training images (one pass; labels unused)."""
        from tqdm.auto import tqdm

        total, n = None, 0
        with eval_mode(self.model):
            reader = self.batch_reader.unlabeled(loader, "DICE.fit's loader (ID training data)")
            for images, _ in tqdm(reader, desc="DICE fit", disable=not progress, leave=False):
                x = self._prepare(images)
                if x.shape[0] == 0:
                    continue
                z, _ = linear_input(self.model, x, self.head, self._head_name, "DICE")
                total = z.sum(0) if total is None else total + z.sum(0)
                n += z.shape[0]
        if n == 0:
            raise ValueError("DICE.fit: the loader yielded no samples")
        self.mean_activation = total / n
        self._mask_cache = None
        return self

    def masked_weight(self) -> torch.Tensor:
        """``M * W`` [C, N] float64 for the current ``p`` (after :meth:`fit`)."""
        if self.mean_activation is None:
            raise RuntimeError("DICE detector is not fitted: call fit(id_train_loader) first")
        if self._mask_cache is None or self._mask_cache[0] != self.p:
            w = self.head.weight.detach().double()
            contribution = self.mean_activation.to(w.device)[None, :] * w
            threshold = linear_quantile(contribution.flatten(), self.p)
            self._mask_cache = (self.p, torch.where(contribution > threshold, w, torch.zeros_like(w)))
        return self._mask_cache[1]

    def replace(self, **params) -> "DICE":
        new = super().replace(**params)
        new._mask_cache = None  # not shared: each copy keeps the mask of its own p
        return new

    def _score_and_predict(self, x):
        w = self.masked_weight()
        z, _ = linear_input(self.model, x, self.head, self._head_name, "DICE")
        logits = z @ w.T
        if self.head.bias is not None:
            logits = logits + self.head.bias.detach().double()
        return -torch.logsumexp(logits, dim=1).float(), logits.argmax(dim=1)
