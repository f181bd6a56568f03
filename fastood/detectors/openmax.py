"""OpenMax (Bendale & Boult, CVPR 2016, "Towards open set deep networks"): per-class mean activation vectors, a
Weibull model of each class's largest distances (extreme value theory), and a recalibrated softmax with an
"unknown" class whose probability is the OOD score."""
import math
import warnings

import torch

from ._streaming import check_labels, check_unfitted
from .base import Detector, eval_mode, logits_of

DISTANCES = ("eucos", "euclidean", "cosine")

#: libMR's FitHigh shifts the tail so its smallest value sits at this constant before the fit (kept, as the
#: authors' library and pytorch-ood do: it changes the fitted CDF only slightly).
TRANSLATION = 10000.0


def weibull_fit(samples: torch.Tensor):
    """Maximum-likelihood two-parameter Weibull fit (location 0) of positive samples [n] -> ``(shape k, scale lam)``
    as floats, for the density ``(k/lam) (x/lam)^(k-1) exp(-(x/lam)^k)``.

    The shape solves the likelihood equation ``sum x^k ln x / sum x^k - 1/k - mean(ln x) = 0`` (increasing in k),
    found by bisection on ``log k`` in float64 with x scaled by its maximum (the equation is scale-free, and the
    scaling keeps ``x^k`` finite for the shapes in the thousands that libMR's translated tails give); then
    ``lam = (mean x^k)^(1/k)``. Samples that are all equal have no finite MLE: ValueError.
    """
    x = samples.reshape(-1).double()
    if x.numel() < 2 or not bool((x > 0).all()):
        raise ValueError(f"weibull_fit needs at least 2 positive samples, got {x.tolist()}")
    top = x.max()
    logy = torch.log(x / top)                   # <= 0
    mean_logy = logy.mean()
    if float(logy.min()) == 0.0:
        raise ValueError("weibull_fit: all samples are equal; the Weibull shape has no finite maximum-likelihood value")

    def equation(log_k):
        k = math.exp(log_k)
        w = torch.exp(k * logy)                 # y^k in (0, 1], the max is 1: no overflow
        return float((w * logy).sum() / w.sum() - mean_logy) - 1.0 / k

    lo, hi = -20.0, 0.0
    while equation(hi) < 0:                     # bracket the root (the equation increases with k)
        lo, hi = hi, hi + 5.0
        if hi > 60:
            raise ValueError("weibull_fit: no root below shape e^60")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if equation(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    k = math.exp(0.5 * (lo + hi))
    lam = float(top) * math.exp(float(torch.logsumexp(k * logy, 0) - math.log(x.numel())) / k)
    return k, lam


class OpenMax(Detector):
    """score = ``P(y = 0 | x)``, the recalibrated probability of the unknown class (paper Alg. 2; higher = more OOD).

    With the activation vector ``v(x)`` = the logits [C] (the paper's AV, fc8), the class MAVs ``mu_j`` and each
    class's Weibull model ``W_j`` of its largest training distances (Alg. 1, libMR ``FitHigh``):

    - ``s = argsort(v)`` descending; for rank ``i = 1..alpha``: ``w_s(i) = 1 - (alpha + 1 - i)/alpha *
      W_s(i)(d(v, mu_s(i)))`` (the rank weights of the authors' ``compute_openmax.py``, which pytorch-ood uses
      too); other classes ``w_j = 1``;
    - ``v^_j = v_j w_j``, ``v^_0 = sum_j v_j (1 - w_j)``, ``P = softmax(v^_0, v^_1, ..., v^_C)``.

    ``W_j(d) = 1 - exp(-((d + 10000 - t_j) / lam_j)^k_j)``, with ``t_j`` the smallest of the ``tail_size`` largest
    training distances of class j, to which the Weibull ``(k_j, lam_j)`` is fitted by maximum likelihood
    (:func:`weibull_fit`; libMR translates the tail by 10000 the same way).

    Args:
        model: a classifier returning logits [B, C].
        tail_size: the number of largest distances per class fitted (paper: 20).
        alpha: the number of top classes revised (paper: 10 for ImageNet's 1000 classes; capped at C).
        distance: ``"eucos"`` = ``|v - mu|_2 / 200 + (1 - cos(v, mu))``, the authors' code's default for the
            paper's results; ``"euclidean"`` (pytorch-ood's default); ``"cosine"``.
        correct_only: MAVs and distances from the correctly classified training images only (the paper,
            True); False uses every labeled image (pytorch-ood).

    ``fit(loader)`` streams labeled ID training data once. Memory: the method needs each class's mean before its
    distances, so fit keeps the activation vectors (N x C float64: 60,000 x 10 = 4.8 MB), not the images; after
    fitting only ``means`` [C, C] and the Weibull parameters remain. Classes without (correctly classified)
    training images get ``W = 1`` (fully revised) with a warning. ``predict_class`` = argmax of the logits.

    Differences from pytorch-ood 0.4.0's ``OpenMax`` (``tailsize=25, alpha=10, euclid_weight=1.0`` there): its
    MAVs use all labeled images, its distance is Euclidean (fastood: ``correct_only=False, distance="euclidean"``
    for its setting); it computes in float32 (the logits as a float32 numpy array, so the translated tail
    ``10000 + d`` has a spacing of 1e-3) and fits with scipy's numerical ``exponweib.fit``, where fastood solves the
    likelihood equation in float64 (its fit's likelihood is never lower). On the recorded case
    (``tests/data/reference_detectors/posthoc_a.json``) the probabilities of the unknown agree to 2e-4.
    """

    hyperparameters = ("tail_size", "alpha", "distance")
    tuning_grid = {"tail_size": [10, 20, 30, 40, 50], "alpha": [1, 2, 3, 5, 10]}

    def __init__(self, model, tail_size: int = 20, alpha: int = 10, distance: str = "eucos",
                 correct_only: bool = True, **batch_options):
        super().__init__(model, **batch_options)
        self.tail_size, self.alpha, self.distance = tail_size, alpha, distance
        self._check_hyperparameters()
        self.correct_only = bool(correct_only)
        self.means = None       # [C, C] MAVs (rows of classes without images: NaN)
        self.shape = None       # [C] Weibull shapes (NaN: no model)
        self.scale = None       # [C]
        self.tail_min = None    # [C] t_j
        self._activations = None  # (v [N, C], y [N]) kept for replace(tail_size=...)

    def _check_hyperparameters(self):
        for name in ("tail_size", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}")

    def replace(self, **params):
        """As :meth:`Detector.replace`; changing ``tail_size`` or ``distance`` refits the Weibull models from the
        activation vectors kept by ``fit`` (no pass over the data)."""
        new = super().replace(**params)
        if self._activations is not None and ("tail_size" in params or "distance" in params):
            new._fit_from(*self._activations)
        return new

    def distances(self, v: torch.Tensor) -> torch.Tensor:
        """``d(v, mu_j)`` [B, C] (float64) of activation vectors v [B, C] to every class's MAV."""
        check_unfitted(self.means, "OpenMax")
        v, mu = v.double(), self.means.to(v.device)
        euclid = torch.cdist(v, mu, compute_mode="donot_use_mm_for_euclid_dist")   # exact differences
        if self.distance == "euclidean":
            return euclid
        cos = 1.0 - (v @ mu.T) / (v.norm(dim=1, keepdim=True) * mu.norm(dim=1)).clamp_min(1e-300)
        return cos if self.distance == "cosine" else euclid / 200.0 + cos

    @torch.no_grad()
    def fit(self, loader, progress: bool = False) -> "OpenMax":
        """MAVs and per-class Weibull models from a labeled ID loader yielding (images, labels)."""
        from tqdm.auto import tqdm

        vs, ys = [], []
        with eval_mode(self.model):
            for images, labels in tqdm(self.batch_reader.labeled(loader, "OpenMax.fit's loader (labeled ID training "
                                                                         "data)"),
                                       desc="OpenMax fit", disable=not progress, leave=False):
                x = self._prepare(images)
                y = check_labels(x, labels, "OpenMax")
                if y.numel() == 0:
                    continue
                v = logits_of(self.model(x), "OpenMax").double()
                if int(y.max()) >= v.shape[1]:
                    raise ValueError(f"OpenMax.fit: label {int(y.max())} but the model has {v.shape[1]} classes")
                if self.correct_only:
                    keep = v.argmax(1) == y
                    v, y = v[keep], y[keep]
                vs.append(v)
                ys.append(y)
        if not vs:
            raise ValueError("OpenMax.fit: the loader yielded no samples")
        v, y = torch.cat(vs), torch.cat(ys)
        if v.shape[0] == 0:
            raise ValueError("OpenMax.fit: no training image is classified correctly (correct_only=True)")
        self._activations = (v, y)
        self._fit_from(v, y)
        return self

    def _fit_from(self, v, y):
        c = v.shape[1]
        counts = torch.bincount(y, minlength=c)
        means = torch.full((c, c), float("nan"), dtype=torch.float64, device=v.device)
        present = counts > 0
        means[present] = torch.zeros(c, c, dtype=torch.float64, device=v.device).index_add_(0, y, v)[present] \
            / counts[present, None]
        self.means = means
        d = self.distances(v).gather(1, y[:, None]).squeeze(1)
        shape = torch.full((c,), float("nan"), dtype=torch.float64)
        scale, tail_min = shape.clone(), shape.clone()
        skipped = []
        for j in range(c):
            dj = d[y == j]
            if dj.numel() < 2:
                skipped.append(j)
                continue
            tail = torch.sort(dj).values[-self.tail_size:]
            tail_min[j] = tail.min()
            try:
                shape[j], scale[j] = weibull_fit(tail + TRANSLATION - tail_min[j])
            except ValueError:
                skipped.append(j)
        if skipped:
            warnings.warn(f"OpenMax.fit: classes {skipped} have fewer than 2 distinct training distances; their "
                          "Weibull probability is taken as 1 (activation fully revised)")
        self.shape, self.scale, self.tail_min = shape, scale, tail_min

    def weibull_probability(self, v: torch.Tensor) -> torch.Tensor:
        """``W_j(d(v, mu_j))`` [B, C] (float64): how far out in class j's tail each activation vector lies."""
        d = self.distances(v)
        shape, scale, tmin = (t.to(d.device) for t in (self.shape, self.scale, self.tail_min))
        ok = ~torch.isnan(shape)
        w = torch.ones_like(d)
        z = (d[:, ok] + TRANSLATION - tmin[ok]).clamp_min(1e-300)
        w[:, ok] = -torch.expm1(-torch.exp(shape[ok] * (torch.log(z) - torch.log(scale[ok]))))
        return w

    def recalibrated(self, v: torch.Tensor) -> torch.Tensor:
        """OpenMax probabilities [B, C + 1] (float64) of activation vectors v [B, C]; column 0 is the unknown."""
        v = v.double()
        c = v.shape[1]
        alpha = min(self.alpha, c)
        ranks = torch.argsort(v, dim=1, descending=True)[:, :alpha]
        weights = torch.zeros_like(v).scatter_(
            1, ranks, ((alpha + 1 - torch.arange(1, alpha + 1, device=v.device, dtype=v.dtype)) / alpha).expand(
                v.shape[0], alpha))
        w = 1.0 - weights * self.weibull_probability(v)
        revised = torch.cat([(v * (1.0 - w)).sum(1, keepdim=True), v * w], dim=1)
        return torch.softmax(revised, dim=1)

    def _score_and_predict(self, x):
        check_unfitted(self.means, "OpenMax")
        logits = logits_of(self.model(x), "OpenMax")
        if logits.shape[1] != self.means.shape[0]:
            raise ValueError(f"OpenMax: fitted for {self.means.shape[0]} classes, the model returned "
                             f"{logits.shape[1]}")
        return self.recalibrated(logits)[:, 0], logits.argmax(dim=1)

    score_dtype = torch.float64
