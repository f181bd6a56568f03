"""Train/eval modes: switching a model (or its BatchNorm layers) temporarily without losing any submodule's own
train/eval flag."""
import contextlib

from torch import nn


def _flagged_modules(model: nn.Module):
    """Every submodule, plus the modules a view keeps outside its registered children (``_path_modules`` of
    :class:`fastood.models.heads._Backbone`: the wrapped model and the head's ancestors), whose ``train()``
    it forwards to."""
    seen = {}
    for module in model.modules():
        seen[id(module)] = module
        for hidden in getattr(module, "_path_modules", ()):
            seen[id(hidden)] = hidden
    return list(seen.values())


def capture_modes(model: nn.Module) -> list:
    """``[(module, training)]`` of every submodule of ``model``: what :func:`restore_modes` puts back."""
    return [(m, m.training) for m in _flagged_modules(model)]


def restore_modes(modes: list) -> None:
    """Put back each module's train/eval flag as :func:`capture_modes` saw it."""
    for m, training in modes:
        m.training = training


def batchnorm_layers(model: nn.Module) -> list:
    """The BatchNorm layers of ``model`` (every ``nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d,
    SyncBatchNorm, LazyBatchNorm)."""
    return [m for m in _flagged_modules(model) if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm_(model: nn.Module) -> nn.Module:
    """Put every BatchNorm layer of ``model`` in eval mode (running statistics fixed and used to normalize; the
    affine weights still train), leaving every other module's mode alone. Returns ``model``."""
    for m in batchnorm_layers(model):
        m.eval()
    return model


@contextlib.contextmanager
def frozen_batchnorm(model: nn.Module):
    """Context manager: every BatchNorm layer of ``model`` in eval mode inside the block, each layer's own
    train/eval flag restored on exit (also on an exception). Other modules keep their mode.

    In eval mode a BatchNorm layer normalizes with its running statistics and does not update them, so outliers or
    generated images in a batch cannot shift the normalization of the ID features; its affine weight and bias still
    get gradients. This is what the fine-tuning trainers' ``freeze_bn=True`` does every step (FIGTrainer's
    default)::

        with fastood.frozen_batchnorm(model):
            loss, logs = objective(model, x, y)
        loss.backward()     # after the block is fine: eval mode only changes the forward pass

    Args:
        model: any ``nn.Module`` (a DDP wrapper too). Yields ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = batchnorm_layers(model)
    modes = [(m, m.training) for m in layers]
    for m in layers:
        m.eval()
    try:
        yield model
    finally:
        restore_modes(modes)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode, restoring every submodule's own train/eval flag afterwards."""
    modes = capture_modes(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(modes)
