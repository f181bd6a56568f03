"""GM (Sastry & Oore, ICML 2020, "Detecting out-of-distribution examples with Gram matrices"): per layer and order
p, the class-wise range of the p-th order Gram matrices of ID training data; the score is how far an input's Gram
values fall outside its predicted class's ranges, each layer normalized by its expected deviation on ID data."""
import warnings

import torch
from torch import nn

from ._feature_hooks import forward_with_taps, is_logits, resolve_layers
from ._streaming import SmallestKeys, check_labels, check_unfitted
from .base import Detector, eval_mode


def gram_vectors(t: torch.Tensor, orders) -> torch.Tensor:
    """Row sums of the p-th order Gram matrices of feature maps t [B, C, ...] -> [B, P, C] float64 (the paper's
    p-th order Gram matrix):
    ``G_p = (F^p (F^p)^T)^(1/p)`` with F = t reshaped [C, HW] and the powers elementwise; the signed p-th root
    ``sign(g) |g|^(1/p)``. Row sums, not the full C x C matrix, as the authors' code (``G_p``) computes them
    ([B, F] outputs count as F channels of one position). Cost O(P C HW) per image: the row sums are
    ``F^p (F^p)^T 1 = F^p ((F^p)^T 1)``, never the C x C matrix."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"GM: a hooked layer produced {type(t).__name__}, expected a tensor")
    f = t.detach().double().reshape(t.shape[0], t.shape[1], -1)
    out = []
    for p in orders:
        fp = f ** p
        # Row sums of fp fp^T without the C x C matrix: sum_j (fp fp^T)_ij = sum_k fp_ik (sum_j fp_jk).
        g = (fp * fp.sum(dim=1, keepdim=True)).sum(dim=2)                      # [B, C]
        out.append(g.sign() * g.abs() ** (1.0 / p))
    return torch.stack(out, dim=1)


def deviation(g: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """The paper's deviation delta summed over entries: ``sum relu(min - g) / |min| + relu(g - max) / |max|`` over
    the last two axes of g [B, P, C] against mins/maxs [B, P, C] -> [B] (``|m + 1e-6|`` in the denominators, as
    the authors' code)."""
    low = torch.relu(mins - g) / (mins + 1e-6).abs()
    high = torch.relu(g - maxs) / (maxs + 1e-6).abs()
    return (low + high).sum(dim=(1, 2))


class GM(Detector):
    """score = ``Delta(x) = sum_l delta_l(x) / E_va[delta_l]`` (the paper's total deviation; higher = more OOD),
    where for the predicted class c = argmax f(x),
    ``delta_l(x) = sum_p sum_j delta(min_c[l,p,j], max_c[l,p,j], G_l^p(x)_j)``, ``delta(mn, mx, v) = 0`` in range,
    ``(mn - v)/|mn|`` below, ``(v - mx)/|mx|`` above, and the min / max are over the ID training images (predicted
    as) class c. ``E_va[delta_l]`` is the mean layer deviation of held-out ID validation images (+1e-7, the
    authors' code).

    Args:
        model: a classifier returning logits [B, C] (the class picks the ranges).
        layers: module names whose outputs are the feature maps; default None = every ``nn.Conv2d`` of the model
            (the authors' code records many intermediate outputs of every ResNet / DenseNet block; pass such names
            for that setting).
        orders: the Gram orders p, default 1..10 (the paper's).
        classes_from: ``"prediction"`` (default, the authors' code: training images are grouped by the model's
            predicted class, as test images are) or ``"label"`` (pytorch-ood).
        val_fraction, val_size: when ``fit`` gets no ``val_loader``, a seeded random ``val_fraction`` (0.1, as the
            paper's 10% validation split) of each training batch is held out of the min / max, and a uniform sample
            of at most ``val_size`` of those images is kept (on the CPU) to estimate ``E_va[delta_l]``.
        normalize: False sums the raw layer deviations (the authors' ``normalize=False``); nothing is held out.

    ``fit(loader, val_loader=None)`` streams the training data once keeping running min / max tables
    (``classes x orders x channels`` per layer, float64: memory independent of the number of images), plus at most
    ``val_size`` held-out images; with ``val_loader`` (labeled if ``classes_from="label"``), the expected deviations
    come from that loader instead (the authors used 10% of the ID test set). Gram values are computed in float64
    (``x^10`` overflows float32 for activations above ~80). Classes that no training image falls in use the range
    over all classes (with a warning).

    Differences from pytorch-ood 0.4.0's ``Gram``: it groups training images by label and keeps every Gram vector
    in memory until the end; its normalization uses a random 10% per class and replaces a zero mean deviation by 1;
    its default orders are 1..(number of layers). With the same grouping and ``normalize=False`` the scores agree
    (``tests/data/reference_detectors``).
    """

    hyperparameters = ("orders",)
    score_dtype = torch.float64

    def __init__(self, model, layers=None, orders=tuple(range(1, 11)), classes_from: str = "prediction",
                 val_fraction: float = 0.1, val_size: int = 1000, normalize: bool = True, seed: int = 0,
                 **batch_options):
        super().__init__(model, **batch_options)
        self.orders = orders
        self._check_hyperparameters()
        if classes_from not in ("prediction", "label"):
            raise ValueError(f"classes_from must be 'prediction' or 'label', got {classes_from!r}")
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        if not (isinstance(val_size, int) and val_size >= 1):
            raise ValueError(f"val_size must be an int >= 1, got {val_size!r}")
        if layers is None:
            layers = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)] if isinstance(
                model, nn.Module) else None
            if layers == []:
                raise ValueError(f"GM: {type(model).__name__} has no nn.Conv2d; pass layers=[name, ...] (names from "
                                 "model.named_modules()) whose outputs are feature maps [B, C, ...]")
        self.classes_from, self.val_fraction, self.val_size = classes_from, float(val_fraction), val_size
        self.normalize, self.seed = bool(normalize), int(seed)
        self._taps = resolve_layers(model, layers, "GM")
        self.layers = [name for name, _, _ in self._taps]
        self.mins = None           # per layer [K, P, C_l]
        self.maxs = None
        self.expected = None       # [L] E_va[delta_l] (ones when normalize=False)
        self.held_out = 0          # training images held out of the ranges by the last fit
        self.val_count = 0         # validation images behind ``expected``

    def _check_hyperparameters(self):
        orders = self.orders
        if isinstance(orders, int):
            orders = [orders]
        orders = tuple(orders) if hasattr(orders, "__iter__") else ()
        if not orders or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in orders):
            raise ValueError(f"orders must be a non-empty list of ints >= 1, got {self.orders!r}")
        self.orders = orders

    def replace(self, **params):
        if "orders" in params:
            raise ValueError("GM.replace: a new orders list needs a refit; build a new GM")
        return super().replace(**params)

    def _grams(self, x):
        grams, output = forward_with_taps(self.model, x, self._taps, "GM",
                                          reduce=lambda t: gram_vectors(t, self.orders))
        if not is_logits(output):
            raise TypeError("GM needs a model returning logits [B, C] (the predicted class picks the ranges)")
        return grams, output

    def layer_deviations(self, grams, classes) -> torch.Tensor:
        """``delta_l`` [B, L] of Gram vectors (per layer [B, P, C_l]) against the ranges of ``classes`` [B]."""
        return torch.stack([deviation(g, mn[classes], mx[classes]) for g, mn, mx in zip(grams, self.mins, self.maxs)],
                           dim=1)

    @torch.no_grad()
    def fit(self, loader, progress: bool = False, val_loader=None) -> "GM":
        """Class-wise Gram ranges from ID training data streamed once, then the expected layer deviations."""
        from tqdm.auto import tqdm

        by_label = self.classes_from == "label"
        read = self.batch_reader.labeled if by_label else self.batch_reader.unlabeled
        generator = torch.Generator().manual_seed(self.seed)
        held = SmallestKeys(self.val_size, self.seed + 1) if val_loader is None and self.normalize else None
        mins = maxs = None
        num_classes = None
        self.held_out = 0
        with eval_mode(self.model):
            for images, labels in tqdm(read(loader, "GM.fit's loader (ID training data)"), desc="GM fit",
                                       disable=not progress, leave=False):
                x = self._prepare(images)
                if x.shape[0] == 0:
                    continue
                y = check_labels(x, labels, "GM") if by_label else None
                if held is not None:
                    out = (torch.rand(x.shape[0], generator=generator) < self.val_fraction).to(x.device)
                    self.held_out += int(out.sum())
                    if out.any():
                        held.add(torch.cat([x[out].flatten(1).cpu(), (y[out] if by_label else
                                            torch.zeros(int(out.sum()), device=x.device)).double().cpu()[:, None]
                                            .to(x.dtype)], 1))
                    x, y = x[~out], (y[~out] if by_label else None)
                    if x.shape[0] == 0:
                        continue
                grams, logits = self._grams(x)
                classes = y if by_label else logits.argmax(1)
                if mins is None:
                    num_classes = logits.shape[1]
                    mins = [torch.full((num_classes,) + g.shape[1:], float("inf"), dtype=torch.float64,
                                       device=g.device) for g in grams]
                    maxs = [torch.full_like(m, float("-inf")) for m in mins]
                if int(classes.max()) >= num_classes:
                    raise ValueError(f"GM.fit: label {int(classes.max())} but the model has {num_classes} classes")
                index = classes[:, None, None]
                for i, g in enumerate(grams):
                    idx = index.expand_as(g)
                    mins[i].scatter_reduce_(0, idx, g, "amin")
                    maxs[i].scatter_reduce_(0, idx, g, "amax")
        if mins is None:
            raise ValueError("GM.fit: the loader yielded no samples (outside the held-out validation fraction)")
        empty = torch.isinf(mins[0][:, 0, 0]).nonzero().flatten().tolist()
        if empty:
            warnings.warn(f"GM.fit: no training image in classes {empty}; they use the range over all classes")
            for mn, mx in zip(mins, maxs):
                mn[empty] = mn[~torch.isinf(mn[:, 0, 0])].amin(0)
                mx[empty] = mx[~torch.isinf(mx[:, 0, 0])].amax(0)
        self.mins, self.maxs = mins, maxs
        self.expected = torch.ones(len(self.layers), dtype=torch.float64)
        if self.normalize:
            self.expected = self._expected_deviation(held, val_loader, x.shape[1:])
        return self

    def _expected_deviation(self, held, val_loader, image_shape):
        total, count = 0.0, 0
        by_label = self.classes_from == "label"
        if val_loader is not None:
            read = self.batch_reader.labeled if by_label else self.batch_reader.unlabeled
            batches = ((images, labels) for images, labels in read(val_loader, "GM.fit's val_loader (ID data)"))
        else:
            rows = held.sample()
            if rows is None:
                raise ValueError(f"GM.fit: no image was held out for validation (val_fraction={self.val_fraction}); "
                                 "pass val_loader= or more data")
            batches = ((r[:, :-1].reshape((-1,) + tuple(image_shape)), r[:, -1].long())
                       for r in rows.split(256))
        with eval_mode(self.model):
            for images, labels in batches:
                x = self._prepare(images)
                if x.shape[0] == 0:
                    continue
                grams, logits = self._grams(x)
                classes = check_labels(x, labels, "GM") if by_label else logits.argmax(1)
                total = total + self.layer_deviations(grams, classes).sum(0)
                count += x.shape[0]
        if count == 0:
            raise ValueError("GM.fit: the validation data yielded no samples")
        self.val_count = count
        return (total / count + 1e-7).cpu()

    def _score_and_predict(self, x):
        check_unfitted(self.mins, "GM")
        grams, logits = self._grams(x)
        pred = logits.argmax(1)
        score = (self.layer_deviations(grams, pred) / self.expected.to(pred.device)).sum(1)
        return score, pred
