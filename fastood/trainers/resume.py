"""What a checkpoint must agree on with the trainer that resumes from it: method, hyperparameters, model structure.

Every :class:`~fastood.trainers.base.Trainer` records, right after construction, its *hyperparameters*: the
simple-typed constructor arguments (numbers, strings, booleans, None, short tuples of those, small tensors)
of every ``__init__`` in its class hierarchy, with defaults filled in. Settings that only say how a run is carried
out (where and how often to checkpoint, progress bars, the device, ...) are left out (:data:`RUN_SETTINGS`).
The record is stored in each checkpoint; resuming refuses with a message naming the difference when the method
(trainer class), a recorded hyperparameter or the model's parameter/buffer names and shapes differ.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch

__all__ = ["RecordsHyperparameters", "RUN_SETTINGS", "ResumeMismatch", "Resumed", "method_name",
           "check_compatible"]

# Constructor arguments that say how a run is carried out rather than what it computes: they may differ between a
# run and its resume. ``amp`` goes with the device (bf16 autocast is CUDA-only, so a CPU resume of a CUDA run turns
# it off), ``sync_bn`` with the number of ranks, ``batch_fn``/``batch_keys`` with how the loader is read.
RUN_SETTINGS = frozenset({"checkpoint_dir", "checkpoint_every", "checkpoint_minutes", "progress", "device", "amp",
                          "skip_nonfinite", "handle_signals", "sync_bn", "batch_fn", "batch_keys"})

_SIMPLE = (bool, int, float, str, type(None))
_SKIP = object()


class ResumeMismatch(ValueError):
    """The checkpoint was written by a different method, with other hyperparameters, or for another model."""


class Resumed(NamedTuple):
    """``trainer.resumed`` after :meth:`fit` continued from a checkpoint (None when it started afresh)."""

    path: str
    step: int
    total_steps: int


def _simple(value):
    """``value`` as a comparable plain value, or ``_SKIP`` when it is not a hyperparameter (a module, a loader)."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and len(value) <= 64:
        items = [_simple(v) for v in value]
        return _SKIP if any(i is _SKIP for i in items) else tuple(items)
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
        attr = _simple(obj.__dict__[name]) if name in vars(obj) else _SKIP
        plain = attr if attr is not _SKIP else _simple(value)
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


def method_name(trainer) -> str:
    """The method a trainer implements: its nearest fastood trainer class (a user subclass of ``FIGTrainer`` that
    adds logging is still FIG), or its own class when it derives from the base ``Trainer`` directly (a user's
    own method)."""
    mro = type(trainer).__mro__
    for cls in mro:
        if cls.__module__.startswith("fastood.") and cls.__name__ != "Trainer":
            return f"{cls.__module__}.{cls.__qualname__}"
    return f"{mro[0].__module__}.{mro[0].__qualname__}"


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def check_compatible(trainer, state: dict, path: str, model_state: dict) -> None:
    """Raise :class:`ResumeMismatch` naming the first difference between ``state`` (a checkpoint of ``path``) and
    ``trainer`` / its model's ``model_state``. Checkpoints without a record (older files) skip those checks."""
    info = state.get("trainer") or {}
    hint = ("; resume with the same settings, choose another checkpoint_dir, or pass fit(resume=False) to start "
            "over (the checkpoint is then overwritten)")
    saved_method = info.get("method")
    if saved_method is not None and saved_method != method_name(trainer):
        raise ResumeMismatch(f"checkpoint {path} was written by {_short(saved_method)}, but this trainer is "
                             f"{type(trainer).__name__}" + hint)
    saved = info.get("hyperparameters")
    if saved is not None:
        mine = getattr(trainer, "hyperparameters", {})
        for name in sorted(set(saved) & set(mine)):
            if saved[name] != mine[name]:
                raise ResumeMismatch(f"checkpoint {path} was written with {name}={saved[name]!r}, but this trainer "
                                     f"has {name}={mine[name]!r}" + hint)
    theirs = state["model"]
    missing = [k for k in model_state if k not in theirs]
    extra = [k for k in theirs if k not in model_state]
    if missing or extra:
        what = (f"the model has {missing[0]!r}, which the checkpoint lacks" if missing
                else f"the checkpoint has {extra[0]!r}, which the model lacks")
        raise ResumeMismatch(f"checkpoint {path} is for another model structure: {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected entries)" + hint)
    for key, value in model_state.items():
        other = theirs[key]
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
            raise ResumeMismatch(f"checkpoint {path} is for another model structure: {key!r} has shape "
                                 f"{tuple(other.shape)} there and {tuple(value.shape)} in the model" + hint)
