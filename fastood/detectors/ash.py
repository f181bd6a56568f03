"""ASH (Djurisic, Bozanic, Ashok, Liu, ICLR 2023): activation shaping, then the energy score."""
import torch

from ._feature_hooks import PENULTIMATE, forward_with_taps, resolve_layers
from .base import Detector, logits_of

VARIANTS = ("p", "b", "s")


def ash_shape(a: torch.Tensor, variant: str, percentile: float) -> torch.Tensor:
    """Activation shaping of a [B, ...] tensor, per sample over all its B's elements (n of them): keep the
    ``k = n - round(n * percentile / 100)`` largest (round half to even, as ``np.round``), zero the rest, then

    - ``"p"`` (prune): keep the kept values;
    - ``"b"`` (binarize): every kept value becomes ``s1 / k``, s1 the sample's sum before pruning;
    - ``"s"`` (scale): multiply the kept values by ``exp(s1 / s2)``, s2 the sum after pruning (a sample whose
      kept values sum to 0 stays all zero).

    Computed in float64, returned in ``a``'s dtype and shape. ValueError when k < 1. Ties at the k-th value are
    broken by ``torch.topk`` (which of equal activations survive is then unspecified, as in the references).
    """
    flat = a.reshape(a.shape[0], -1).double()
    n = flat.shape[1]
    k = n - int(round(n * percentile / 100.0))
    if k < 1:
        raise ValueError(f"ASH: percentile {percentile:g} prunes all {n} activations of a sample; use a smaller "
                         "percentile")
    values, index = flat.topk(k, dim=1)
    s1 = flat.sum(dim=1, keepdim=True)
    if variant == "b":
        values = (s1 / k).expand_as(values)
    elif variant == "s":
        s2 = values.sum(dim=1, keepdim=True)
        safe = torch.where(s2 == 0, torch.ones_like(s2), s2)
        values = torch.where(s2 == 0, torch.zeros_like(values), values * torch.exp(s1 / safe))
    out = torch.zeros_like(flat).scatter_(1, index, values)
    return out.reshape(a.shape).to(a.dtype)


class ASH(Detector):
    """Activation SHaping (Djurisic et al., ICLR 2023, Sec. 3): at a late layer, per sample, remove the
    ``percentile`` % smallest activations and keep the rest (ASH-P), set them to one value that keeps the sum
    (ASH-B) or scale them by ``exp(s1 / s2)`` (ASH-S); see :func:`ash_shape`. The model's forward pass continues
    from the shaped activations, and the score is the energy of the resulting logits f:

        score = ``-logsumexp_k f_k``   (higher = more OOD).

    Args:
        model: a classifier returning logits [B, C].
        variant: ``"p"``, ``"b"`` or ``"s"`` (also ``"ash-s"`` etc.). Default ``"s"``.
        percentile: in percent, 0 <= p < 100 (the paper's ASH-S@90 is ``percentile=90``). Default 90, the
            paper's headline setting (ASH-S@90 on ImageNet; its ImageNet table also lists ASH-P@60 and ASH-B@65);
            its CIFAR runs use 65-95. Tune with :func:`fastood.detectors.tune_detector` over :attr:`grid`.
        layer: the module (a name in ``model.named_modules()``) whose output is shaped, all its elements per
            sample (e.g. ``"layer4"``: C*H*W values); default None = the penultimate features, the input of the
            final linear layer (found as :func:`fastood.models.split_head` does), i.e. after the global average
            pool, where the paper applies ASH.

    No fitting (``fit`` is a no-op). ``predict_class`` is the shaped network's argmax (the network whose ID
    accuracy the paper reports).

    References: OpenOOD's ``ASHNet`` shapes the average-pooled penultimate features [B, C, 1, 1] with the same k
    and fills, and returns ``logsumexp`` as confidence (fastood's score is its negative); pytorch-ood 0.4.0's
    ``ASH`` takes ``percentile`` as a fraction in [0, 1] and shapes a backbone's [B, C, H, W] output. fastood
    shapes in float64 and leaves a sample whose kept activations sum to 0 at zero under ASH-S (the references
    divide by 0 there).
    """

    hyperparameters = ("variant", "percentile")
    #: a tuning grid (the references' percentile sweep, widened down to the paper's ImageNet ASH-P@60).
    grid = {"variant": ["p", "b", "s"], "percentile": [60, 65, 70, 75, 80, 85, 90, 95]}

    def __init__(self, model, variant: str = "s", percentile: float = 90.0, layer: str = None, **batch_options):
        super().__init__(model, **batch_options)
        self.variant, self.percentile = variant, percentile
        self._check_hyperparameters()
        self._taps = resolve_layers(model, None if layer is None else [layer], "ASH")
        self.layer = self._taps[0][0]

    @property
    def name(self) -> str:
        base = super().name
        return base if self.layer == PENULTIMATE else f"{base[:-1]}, layer={self.layer!r})"

    def _check_hyperparameters(self):
        variant = self.variant.lower().removeprefix("ash-") if isinstance(self.variant, str) else self.variant
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of 'p' (prune), 'b' (binarize), 's' (scale), got {self.variant!r}")
        if isinstance(self.percentile, bool) or not (isinstance(self.percentile, (int, float))
                                                     and 0 <= self.percentile < 100):
            raise ValueError(f"percentile must be a number in [0, 100) (percent of activations removed), "
                             f"got {self.percentile!r}")
        self.variant, self.percentile = variant, float(self.percentile)

    def _score_and_predict(self, x):
        _, output = forward_with_taps(self.model, x, self._taps, "ASH",
                                      transform=lambda a: ash_shape(a, self.variant, self.percentile))
        logits = logits_of(output, "ASH").float()
        return -torch.logsumexp(logits, dim=1), logits.argmax(dim=1)
