"""ReAct (Sun, Guo, Li, NeurIPS 2021, "ReAct: out-of-distribution detection with rectified activations"): clip the
penultimate activations at the p-th percentile of their ID values, then score the clipped network's energy."""
import torch

from ._feature_hooks import forward_with_taps, resolve_layers
from ._streaming import SmallestKeys
from .base import Detector, eval_mode, logits_of


def percentile(values: torch.Tensor, p: float) -> float:
    """The p-th percentile (p in [0, 100]) of a 1-D tensor with linear interpolation between order statistics
    (numpy's default, ``np.percentile(values, p)``), computed in float64 with two ``kthvalue`` calls (no size
    limit, unlike ``torch.quantile``)."""
    v = values.reshape(-1).double()
    n = v.numel()
    pos = (n - 1) * p / 100.0
    lo = int(pos // 1)
    hi = min(lo + 1, n - 1)
    a = v.kthvalue(lo + 1).values
    b = v.kthvalue(hi + 1).values if hi != lo else a
    return float(a + (b - a) * (pos - lo))


class ReAct(Detector):
    """score = ``-log sum_k exp(f_k(x; c))`` (the energy score negated, so higher = more OOD), where the
    logits ``f(x; c) = W^T min(h(x), c) + b`` (the paper's ReAct operation) come from the penultimate activations
    h(x) clipped at c, the ``percentile``-th percentile of the activations of ID data (all units of all training
    images, flattened).

    Args:
        model: a classifier returning logits [B, C].
        percentile: p in (0, 100]; default 90, the paper's choice (its ablation sweeps other p); ``tuning_grid`` =
            OpenOOD's {85, 90, 95, 99}.
        layer: a module name whose output is clipped (elementwise) instead; the rest of the network runs on the
            clipped output. Default None = the input of the final linear layer (found with
            :func:`fastood.models.split_head`), as the paper.
        threshold: give c directly (then ``fit`` is optional).
        max_samples: ``fit`` keeps a uniform random sample of at most this many activation values (seeded by
            ``seed``), so its memory does not grow with the data set: exact while the training set has at most
            ``max_samples`` activation values (default 2**24, 64 MiB float32; e.g. 60,000 images x 128 features =
            7.7M: exact); beyond, the percentile of the sample, whose rank error has standard deviation
            ``sqrt(p (1 - p) / max_samples)`` = 7e-5 at p = 0.9.

    ``predict_class`` is the argmax of the clipped logits (the ReAct network's classes; the paper reports its ID
    accuracy as nearly unchanged). After fitting: ``threshold`` (float).

    Differences from pytorch-ood 0.4.0's ``ReAct``: there ``percentile`` is a fraction (0.9), here a percentage
    (90); it keeps every activation in memory, fastood a bounded sample (identical results while the data fit).
    """

    hyperparameters = ("percentile",)
    tuning_grid = {"percentile": [85, 90, 95, 99]}

    def __init__(self, model, percentile: float = 90.0, layer: str = None, threshold: float = None,
                 max_samples: int = 2 ** 24, seed: int = 0, **batch_options):
        super().__init__(model, **batch_options)
        self.percentile = percentile
        self._check_hyperparameters()
        if not (isinstance(max_samples, int) and max_samples >= 1):
            raise ValueError(f"max_samples must be an int >= 1, got {max_samples!r}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold == threshold):
            raise ValueError(f"threshold must be a number or None, got {threshold!r}")
        self.max_samples, self.seed = max_samples, int(seed)
        self._taps = resolve_layers(model, None if layer is None else [layer], "ReAct")
        self.layer = self._taps[0][0]
        self.threshold = None if threshold is None else float(threshold)
        self.fit_exact = None  # whether the fitted percentile used every activation

    def _check_hyperparameters(self):
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise ValueError(f"percentile must be a number in (0, 100] (a percentage, e.g. 90), got "
                             f"{self.percentile!r}")
        self.percentile = float(self.percentile)

    def replace(self, **params):
        """As :meth:`Detector.replace`; a new ``percentile`` needs a refit (the threshold is cleared)."""
        new = super().replace(**params)
        if "percentile" in params and params["percentile"] != self.percentile:
            new.threshold = None
        return new

    def _run(self, x, clip: float = None, collect: list = None):
        """The model's output with the target's activations clipped at ``clip`` (None: unchanged); ``collect``
        receives the (unclipped) activations, flattened, in the model's dtype."""
        (values,), out = forward_with_taps(self.model, x, self._taps, "ReAct",
                                           transform=None if clip is None else (lambda t: t.clamp(max=clip)),
                                           reduce=None if collect is None else lambda t: t.detach().reshape(-1).clone())
        if collect is not None:
            collect.append(values)
        return out

    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "ReAct":
        """The clipping threshold from ID training images streamed once (labels not needed)."""
        from tqdm.auto import tqdm

        sample = SmallestKeys(self.max_samples, self.seed)
        with eval_mode(self.model):
            for images, _ in tqdm(self.batch_reader.unlabeled(loader, "ReAct.fit's loader (ID training data)"),
                                  desc="ReAct fit", disable=not progress, leave=False):
                x = self._prepare(images)
                if x.shape[0] == 0:
                    continue
                collected = []
                self._run(x, None, collected)
                sample.add(collected[-1])
        values = sample.sample()
        if values is None:
            raise ValueError("ReAct.fit: the loader yielded no samples")
        self.threshold = percentile(values, self.percentile)
        self.fit_exact = sample.complete
        return self

    def clipped_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of the network (eval mode, no autograd) with the target's activations clipped at
        ``threshold``."""
        x = self._prepare(x)
        with eval_mode(self.model), torch.no_grad():
            return self._clipped_logits(x)

    def _clipped_logits(self, x):
        if self.threshold is None:
            raise RuntimeError("ReAct detector is not fitted: call fit(id_train_loader) first (or pass threshold=)")
        return logits_of(self._run(x, self.threshold), "ReAct")

    def _score_and_predict(self, x):
        logits = self._clipped_logits(x)
        return -torch.logsumexp(logits.double(), dim=1).float(), logits.argmax(dim=1)
