"""Temporarily switching a model to eval mode without losing any submodule's own train/eval flag."""
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


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode, restoring every submodule's own train/eval flag afterwards."""
    modes = [(m, m.training) for m in _flagged_modules(model)]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
