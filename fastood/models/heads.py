"""Splitting a classifier into feature extractor and final linear layer, and the two-head model of Yu & Aizawa."""
import torch
from torch import nn

from ._checks import positive_int

_HEAD_NAMES = ("fc", "classifier", "head", "linear")


def _find_head(model: nn.Module):
    """(dotted path, final nn.Linear) of ``model``, or TypeError naming what was looked for."""
    if isinstance(model, nn.Sequential):
        if len(model) == 0 or not isinstance(model[-1], nn.Linear):
            got = type(model[-1]).__name__ if len(model) else "an empty Sequential"
            raise TypeError(f"split_head: an nn.Sequential must end in nn.Linear, got {got}")
        return str(len(model) - 1), model[-1]
    for name in _HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Linear):
            return name, module
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[-1], nn.Linear):
            return f"{name}.{len(module) - 1}", module[-1]
    raise TypeError(f"split_head: cannot find the final nn.Linear of {type(model).__name__}: looked for an attribute "
                    f"{' / '.join(_HEAD_NAMES)} that is an nn.Linear (or an nn.Sequential ending in one), or an "
                    "nn.Sequential ending in nn.Linear")


class _HeadReached(Exception):
    """Raised by the head's pre-hook to stop the forward pass once the features are known."""


class _Backbone(nn.Module):
    """Every module and parameter of ``model`` except the head at ``head_path``; ``forward(x)`` -> the head's
    input, flattened to [B, feat_dim].

    The modules are shared with ``model`` (no copy): training the backbone trains the model. The head is not
    registered here, so ``backbone.parameters()`` never contains it (freezing the backbone leaves the head
    trainable). The forward pass is ``model.features(x)`` for fastood's own models; for any other model it runs
    ``model(x)`` with a pre-hook on the head that captures the head's input and stops the pass there (the head
    is never evaluated). A model that calls its head more than once per pass gives the first call's input.
    """

    def __init__(self, model: nn.Module, head_path: str, use_features: bool):
        super().__init__()
        self.__dict__["_model"] = model        # not registered: its head must stay out of this module
        self.__dict__["_head"] = model.get_submodule(head_path)
        self.__dict__["_path_modules"] = []    # model and the ancestors of the head
        self.use_features = use_features
        self.parts = nn.ModuleDict()
        owner, prefix = model, ""
        steps = head_path.split(".")
        for depth, step in enumerate(steps):
            self._path_modules.append(owner)
            for name, p in owner.named_parameters(recurse=False):
                self.register_parameter(f"{prefix}{name}".replace(".", "-"), p)
            for name, b in owner.named_buffers(recurse=False):
                self.register_buffer(f"{prefix}{name}".replace(".", "-"), b)
            for name, child in owner.named_children():
                if name != step:
                    self.parts[f"{prefix}{name}".replace(".", "-")] = child
            owner, prefix = getattr(owner, step), f"{prefix}{step}."

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._path_modules:      # e.g. a forward that reads self.training
            module.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_features:
            return torch.flatten(self._model.features(x), 1)
        captured = []

        def stop_at_head(module, args):
            captured.append(args[0])
            raise _HeadReached

        handle = self._head.register_forward_pre_hook(stop_at_head)
        try:
            self._model(x)
        except _HeadReached:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"split_head: the forward pass of {type(self._model).__name__} never called its head "
                               f"{type(self._head).__name__}; cannot find the features")
        return torch.flatten(captured[0], 1)


class _SequentialBackbone(nn.Sequential):
    """All but the last module of an ``nn.Sequential`` (shared), output flattened to [B, feat_dim]."""

    def forward(self, x):
        return torch.flatten(super().forward(x), 1)


def split_head(model: nn.Module):
    """``(backbone, head)`` of a classifier whose last layer is linear.

    ``head`` is the final ``nn.Linear`` itself (the same module, not a copy). ``backbone(x)`` gives the head's
    input features [B, head.in_features] (flattened), so ``head(backbone(x)) == model(x)`` for models whose
    output is the head's output. The backbone shares every other module and parameter with ``model`` and holds no
    head parameter.

    Works for torchvision ResNets, fastood's models (``fc``), models whose ``classifier`` / ``head`` / ``linear`` is
    an ``nn.Linear`` or an ``nn.Sequential`` ending in one (e.g. torchvision DenseNet, VGG, MobileNet), and
    ``nn.Sequential`` ending in ``nn.Linear``. Anything else raises TypeError.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"split_head: model must be an nn.Module, got {type(model).__name__}")
    path, head = _find_head(model)
    if isinstance(model, nn.Sequential):
        return _SequentialBackbone(*list(model)[:-1]), head
    from .resnet import ResNetCifar
    from .small_cnn import SmallCNN

    # fastood's models compute fc(features(x)); for any other model the features come from a hook on the head.
    use_features = isinstance(model, (SmallCNN, ResNetCifar)) and path == "fc"
    return _Backbone(model, path, use_features), head


class TwoHead(nn.Module):
    """Shared feature extractor with two independently initialized linear heads (Yu & Aizawa, ICCV 2019).

    ``forward(x)`` -> ``(logits1, logits2)``, each [B, num_classes]; ``features(x)`` -> [B, feat_dim]. The
    discrepancy ``sum_k |softmax(logits1)_k - softmax(logits2)_k|`` is the OOD score (higher = more OOD; see
    :class:`fastood.detectors.Discrepancy`).
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        feat_dim, num_classes = positive_int("feat_dim", feat_dim), positive_int("num_classes", num_classes)
        self.backbone = backbone
        self.head1 = nn.Linear(feat_dim, num_classes)
        self.head2 = nn.Linear(feat_dim, num_classes)

    @classmethod
    def from_model(cls, model: nn.Module) -> "TwoHead":
        """Two heads on ``model``'s feature extractor (found with :func:`split_head`, shared, not copied):
        ``head1`` = the model's trained head (the same module), ``head2`` = a fresh, independently initialized
        ``nn.Linear`` of the same size, dtype and device."""
        backbone, head = split_head(model)
        two = cls(backbone, head.in_features, head.out_features)
        two.head1 = head
        two.head2 = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                              device=head.weight.device, dtype=head.weight.dtype)
        return two

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor):
        z = self.backbone(x)
        return self.head1(z), self.head2(z)
