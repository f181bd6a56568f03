"""Features of any ``nn.Module`` by layer name, read (or reshaped) with forward hooks during the model's own forward
pass; shared by the feature-space detectors (Mahalanobis, ViM, ASH, DICE, relative Mahalanobis).

A *tap* is ``(name, module, use_input)``: ``use_input`` reads the module's input (a forward pre-hook; used for the
penultimate features, the input of the final linear layer), otherwise its output (a forward hook).
"""
import torch
from torch import nn

PENULTIMATE = "penultimate"


def pool_features(t, who: str) -> torch.Tensor:
    """Features [B, F] in float64: global average pool of [B, C, H, W] (or [B, C, L]), flatten of [B, F]."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: a hooked layer produced {type(t).__name__}, expected a tensor")
    t = t.mean(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t.reshape(t.shape[0], -1)
    return t.double()


def final_linear(model: nn.Module, who: str, head=None, hint: str = "name the final linear layer with head=..."):
    """``(name, nn.Linear)``: the module called ``head`` (it must be an ``nn.Linear``), or by default the final linear
    layer that :func:`fastood.models.split_head` finds (TypeError naming what was looked for when there is none)."""
    if head is None:
        from fastood.models.heads import _find_head

        try:
            return _find_head(model)
        except TypeError as err:
            raise TypeError(f"{who}: cannot find the model's penultimate layer: {err}; {hint}") from None
    modules = dict(model.named_modules())
    if not isinstance(head, str) or head not in modules:
        raise ValueError(f"{who}: head must name an nn.Linear submodule of the model, got {head!r}; valid names "
                         f"include {[n for n in modules if n][:15]}")
    if not isinstance(modules[head], nn.Linear):
        raise TypeError(f"{who}: head {head!r} must be an nn.Linear, got {type(modules[head]).__name__}")
    return head, modules[head]


def resolve_layers(model: nn.Module, layers, who: str):
    """Taps for ``layers``: None = the penultimate features (input of the final linear layer, as
    :func:`fastood.models.split_head` finds it), else a non-empty list of ``model.named_modules()`` names."""
    if layers is None:
        return [(PENULTIMATE, final_linear(model, who, hint="name the feature layer (layer= / layers=)")[1], True)]
    if isinstance(layers, str) or not layers:
        raise ValueError(f"{who}: layers must be a non-empty list of module names, got {layers!r}")
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"{who}: layers {missing} not found in the model; valid names include "
                         f"{[n for n in modules if n][:15]}")
    return [(n, modules[n], False) for n in layers]


def forward_with_taps(model: nn.Module, x: torch.Tensor, taps, who: str, transform=None, reduce=None):
    """``(raw activations per tap (as the layer produced them, before any transform), model output)`` from one
    forward pass of ``model(x)``. ``transform(tensor) -> tensor``, if given, replaces each tapped activation in the
    forward pass (activation shaping). ``reduce(tensor) -> tensor``, if given, is applied to each tapped activation
    inside the hook and its result returned instead of the raw activation: e.g. ``pool_features`` or GM's Gram
    vectors, computed before an in-place op later in the network (torchvision's ``ReLU(inplace=True)``) can change
    the tensor, and without keeping the full feature map. A module called several times in one pass contributes its
    last call."""
    seen, handles = {}, []

    def grab(name, value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{who}: layer {name!r} produced {type(value).__name__}, expected a tensor")
        seen[name] = value if reduce is None else reduce(value)
        return value if transform is None else transform(value)

    for name, module, use_input in taps:
        if use_input:
            hook = (lambda n: lambda m, args: (grab(n, args[0]),) + tuple(args[1:]))(name)
            handles.append(module.register_forward_pre_hook(hook))
        else:
            hook = (lambda n: lambda m, args, out: grab(n, out))(name)
            handles.append(module.register_forward_hook(hook))
    try:
        output = model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, _, _ in taps if name not in seen]
    if missing:
        raise RuntimeError(f"{who}: layers {missing} were not called in the model's forward pass")
    return [seen[name] for name, _, _ in taps], output


def is_logits(output) -> bool:
    """True for a model output that is one logits tensor [B, C]."""
    return isinstance(output, torch.Tensor) and output.dim() == 2


def linear_input(model: nn.Module, x: torch.Tensor, head: nn.Linear, head_name: str, who: str):
    """``(z [B, F] float64, model output)``: the input of the linear layer ``head`` (flattened) in one forward
    pass. TypeError when that input is not [B, head.in_features] after flattening."""
    (z,), output = forward_with_taps(model, x, [(head_name, head, True)], who)
    z = z.reshape(z.shape[0], -1)
    if z.shape[1] != head.in_features:
        raise TypeError(f"{who}: the input of head {head_name!r} has shape {tuple(z.shape)} after flattening, expected "
                        f"[B, {head.in_features}] (one feature vector per image)")
    return z.double(), output
