"""Hyperparameters: the simple-typed constructor arguments of an object, recorded right after construction.

Used by every trainer (:class:`~fastood.trainers.base.Trainer`) and by the samplers, whose record then becomes part
of the trainer's (``sampler=...``), so that resuming a checkpoint with another sampler setting is refused
(:mod:`fastood.trainers.resume`). A dependency-free module: samplers and trainers both import it.
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["RecordsHyperparameters", "RUN_SETTINGS", "simple_value"]

# Constructor arguments that say how a run is carried out rather than what it computes: they may differ between a
# run and its resume. ``amp`` goes with the device (bf16 autocast is CUDA-only, so a CPU resume of a CUDA run turns
# it off), ``sync_bn`` with the number of ranks, ``batch_fn``/``batch_keys`` with how the loader is read.
RUN_SETTINGS = frozenset({"checkpoint_dir", "checkpoint_every", "checkpoint_minutes", "progress", "device", "amp",
                          "skip_nonfinite", "handle_signals", "sync_bn", "batch_fn", "batch_keys",
                          # samplers: how the chains are run, not what they compute
                          "cuda_graph", "channels_last", "compact_below", "fold_batchnorm"})

_SIMPLE = (bool, int, float, str, type(None))
_SKIP = object()


def simple_value(value):
    """``value`` as a comparable plain value, or ``_SKIP`` when it is not a hyperparameter (a module, a loader)."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and len(value) <= 64:
        items = [simple_value(v) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else tuple(items)
    record = getattr(value, "hyperparameters", None)
    if isinstance(record, dict) and not isinstance(value, type):  # a sampler: its class and its own record
        return (type(value).__qualname__,) + tuple(sorted(record.items()))
    if isinstance(value, torch.Tensor) and value.numel() <= 64 and not value.requires_grad:
        return tuple(value.detach().cpu().reshape(-1).tolist())
    return _SKIP



def _record(obj, args, kwargs) -> dict:
    cls = type(obj)
    values = {}
    # Defaults, base classes first so that a subclass's default of the same name wins.
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for name, p in inspect.signature(init).parameters.items():
            if p.default is not inspect.Parameter.empty:
                values[name] = p.default
    try:
        bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
    except TypeError:
        bound = None
    if bound is not None:
        for name, value in bound.arguments.items():
            kind = bound.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:
                values[name] = value
    record = {}
    for name, value in values.items():
        if name in ("self", "model") or name in RUN_SETTINGS:
            continue
        # The attribute of the same name, when simple, is the value after validation (lr=None -> the method's
        # default lr, lam=1 -> 1.0), so equivalent spellings compare equal.
        # Only instance attributes: a property (``optimizer``) must not run here.
        attr = simple_value(obj.__dict__[name]) if name in vars(obj) else _SKIP
        plain = attr if attr is not _SKIP else simple_value(value)
        if plain is not _SKIP:
            record[name] = plain
    return record


class RecordsHyperparameters(type):
    """Metaclass of :class:`~fastood.trainers.base.Trainer`: stores ``hyperparameters`` on every new trainer once
    its (most derived) ``__init__`` has returned."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        obj.hyperparameters = _record(obj, args, kwargs)
        return obj


