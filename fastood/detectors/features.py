"""Features of any ``nn.Module`` by layer name, for the feature-based detectors (Mahalanobis, KNN, GM, DRF, ...).

- :func:`pool`: a layer output [B, C, ...] -> [B, C] float64 (global average pool; [B, F] kept as is).
- :func:`resolve_layers`: layer names -> the modules to hook; ``None`` = the penultimate features (the input of the
  final linear layer, found with :func:`fastood.models.split_head`).
- :class:`LayerFeatures`: ``feats, output = LayerFeatures(model, layers)(x)`` runs one forward pass and returns each
  layer's output, already reduced by ``transform`` inside the hook (so an in-place op later in the network, e.g.
  torchvision's ``ReLU(inplace=True)``, cannot change it, and full feature maps are never kept).

Errors name what was asked for: a layer name that does not exist (with the valid names), a model whose penultimate
layer cannot be found, a layer that the forward pass never called.
"""
import torch
from torch import nn

#: Name of the default "layer": the input of the model's final nn.Linear.
PENULTIMATE = "penultimate"


def pool(t: torch.Tensor, who: str = "detector") -> torch.Tensor:
    """Features [B, F] in float64: global average pool of [B, C, H, W] (or [B, C, L]), flatten of [B, F]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: a hooked layer produced {type(t).__name__}, expected a tensor")
    t = t.mean(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t.reshape(t.shape[0], -1)
    return t.double()


def penultimate_module(model: nn.Module, who: str = "detector") -> nn.Module:
    """The model's final ``nn.Linear`` (its input is the penultimate features); TypeError if there is none."""
    from fastood.models import split_head

    try:
        return split_head(model)[1]
    except TypeError as err:
        raise TypeError(f"{who}: cannot find the penultimate layer of {type(model).__name__} ({err}); pass "
                        "layers=[name, ...] (names from model.named_modules())") from None


def resolve_layers(model: nn.Module, layers=None, who: str = "detector"):
    """``[(name, module, use_input)]`` to hook: ``layers=None`` -> ``[("penultimate", final linear, True)]`` (its
    input is hooked), else each named submodule's output (``use_input`` False). ValueError for unknown names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    if layers is None:
        return [(PENULTIMATE, penultimate_module(model, who), True)]
    if isinstance(layers, str) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{who}: layers must be a non-empty list of module names, got {layers!r}")
    layers = list(layers)
    if not layers or not all(isinstance(n, str) for n in layers):
        raise ValueError(f"{who}: layers must be a non-empty list of module names, got {layers!r}")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules and n != PENULTIMATE]
    if missing:
        raise ValueError(f"{who}: layers {missing} not found in the model; valid names include "
                         f"{[n for n in modules if n][:15]}")
    return [(n, penultimate_module(model, who), True) if n == PENULTIMATE else (n, modules[n], False)
            for n in layers]


class LayerFeatures:
    """One forward pass of ``model`` that also returns the (transformed) outputs of some of its layers.

    Args:
        model: any ``nn.Module``.
        layers: module names (``model.named_modules()``; ``"penultimate"`` = the input of the final linear layer), or
            None for the penultimate features alone.
        transform: ``tensor -> tensor`` applied in the hook to each layer's output (default :func:`pool`:
            [B, F] float64); ``None`` keeps the raw output.
        who: the detector's name, for error messages.

    ``feats, output = extractor(x)``: ``feats`` is a list with one entry per layer (in ``names`` order), ``output``
    the model's output. A module called several times in one pass contributes its last call.
    """

    def __init__(self, model: nn.Module, layers=None, transform=pool, who: str = "detector"):
        self.model, self.who = model, who
        self.targets = resolve_layers(model, layers, who)
        self.names = [name for name, _, _ in self.targets]
        self.transform = transform

    def _apply(self, t):
        if self.transform is None:
            return t
        return self.transform(t, self.who) if self.transform is pool else self.transform(t)

    def __call__(self, x: torch.Tensor):
        feats, handles = {}, []
        try:
            for name, module, use_input in self.targets:
                if use_input:
                    hook = (lambda n: lambda m, args: feats.__setitem__(n, self._apply(args[0])))(name)
                    handles.append(module.register_forward_pre_hook(hook))
                else:
                    hook = (lambda n: lambda m, args, out: feats.__setitem__(n, self._apply(out)))(name)
                    handles.append(module.register_forward_hook(hook))
            output = self.model(x)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name in self.names if name not in feats]
        if missing:
            raise RuntimeError(f"{self.who}: layers {missing} were not called in the model's forward pass")
        return [feats[name] for name in self.names], output


def logits_or_none(output):
    """The model output if it is logits [B, C], else None."""
    return output if isinstance(output, torch.Tensor) and output.dim() == 2 else None


def check_unfitted(value, who: str):
    """RuntimeError ``"<who> detector is not fitted: call fit(id_train_loader) first"`` when ``value`` is None."""
    if value is None:
        raise RuntimeError(f"{who} detector is not fitted: call fit(id_train_loader) first")


def check_labels(x: torch.Tensor, labels: torch.Tensor, who: str) -> torch.Tensor:
    """Labels [B] long on x's device, checked against the batch (count, >= 0)."""
    y = labels.to(x.device).long().reshape(-1)
    if y.numel() != x.shape[0]:
        raise ValueError(f"{who}.fit: {x.shape[0]} images but {y.numel()} labels in a batch")
    if y.numel() and y.min() < 0:
        raise ValueError(f"{who}.fit: labels must be >= 0, got {int(y.min())}")
    return y


class SmallestKeys:
    """A uniform random sample without replacement of at most ``size`` rows from a stream of batches, in memory
    O(size): every row gets a random key (from a seeded generator) and the rows with the ``size`` smallest keys are
    kept. While fewer than ``size`` rows have been seen, every row is kept (the sample is the whole stream)."""

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.generator = torch.Generator().manual_seed(seed)
        self._keys, self._rows, self._held = [], [], 0
        self.seen = 0

    def add(self, rows: torch.Tensor):
        keys = torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64).to(rows.device)
        self.seen += rows.shape[0]
        self._keys.append(keys)
        self._rows.append(rows)
        self._held += rows.shape[0]
        if self._held > 2 * self.size:   # compact now and then: amortized O(1) work per row
            self._compact()

    def _compact(self):
        keys, rows = torch.cat(self._keys), torch.cat(self._rows)
        if rows.shape[0] > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, rows = keys[keep], rows[keep]
        self._keys, self._rows, self._held = [keys], [rows], rows.shape[0]

    def sample(self):
        """The kept rows (at most ``size``; None if nothing was added)."""
        if not self._rows:
            return None
        self._compact()
        return self._rows[0]

    @property
    def complete(self) -> bool:
        """True when every row seen is in the sample."""
        return self.seen <= self.size
