"""Splitting a classifier into feature extractor and final linear layer, and the two-head model."""
import copy

import torch
from torch import nn


class _Backbone(nn.Module):
    """Everything of ``model`` except its final linear layer ``head_name``: x -> flattened features."""

    def __init__(self, model: nn.Module, head_name: str):
        super().__init__()
        self.model = model
        self.head_name = head_name

    def forward(self, x):
        if hasattr(self.model, "features") and callable(self.model.features):
            return torch.flatten(self.model.features(x), 1)
        captured = {}
        head = getattr(self.model, self.head_name)
        handle = head.register_forward_pre_hook(lambda m, inputs: captured.setdefault("z", inputs[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return torch.flatten(captured["z"], 1)


class _SequentialBackbone(nn.Sequential):
    def forward(self, x):
        return torch.flatten(super().forward(x), 1)


def split_head(model: nn.Module):
    """``(backbone, head)`` of a classifier: ``head`` is its final ``nn.Linear`` (the same module, not a copy),
    ``backbone(x)`` gives the head's input features [B, feat_dim].

    Works for torchvision ResNets and fastood models (``fc``), and for ``nn.Sequential`` ending in ``nn.Linear``.
    """
    if isinstance(model, nn.Sequential):
        if len(model) == 0 or not isinstance(model[-1], nn.Linear):
            raise TypeError(f"split_head: an nn.Sequential must end in nn.Linear, got {type(model[-1]).__name__ if len(model) else 'an empty Sequential'}")
        return _SequentialBackbone(*list(model)[:-1]), model[-1]
    for name in ("fc", "classifier", "head", "linear"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return _Backbone(model, name), head
    raise TypeError(f"split_head: cannot find the final nn.Linear of {type(model).__name__}: looked for an attribute "
                    "fc / classifier / head / linear that is an nn.Linear, or an nn.Sequential ending in one")


class TwoHead(nn.Module):
    """Shared feature extractor with two independently initialized linear heads (Yu & Aizawa, ICCV 2019).

    ``forward(x)`` -> ``(logits1, logits2)``, each [B, num_classes].
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head1 = nn.Linear(feat_dim, num_classes)
        self.head2 = nn.Linear(feat_dim, num_classes)

    @classmethod
    def from_model(cls, model: nn.Module) -> "TwoHead":
        """Two heads on ``model``'s feature extractor: head1 = its trained head, head2 = a fresh one."""
        backbone, head = split_head(model)
        two = cls(backbone, head.in_features, head.out_features)
        two.head1 = head
        two.head2 = copy.deepcopy(head)
        two.head2.reset_parameters()
        return two

    def features(self, x):
        return self.backbone(x)

    def forward(self, x):
        z = self.backbone(x)
        return self.head1(z), self.head2(z)
