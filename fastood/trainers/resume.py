"""What a checkpoint must agree on with the trainer that resumes from it: method, hyperparameters, model structure.

Every :class:`~fastood.trainers.base.Trainer` records, right after construction, its *hyperparameters*: the
simple-typed constructor arguments (numbers, strings, booleans, None, short tuples of those, small tensors)
of every ``__init__`` in its class hierarchy, with defaults filled in. Settings that only say how a run is carried
out (where and how often to checkpoint, progress bars, the device, ...) are left out (:data:`RUN_SETTINGS`).
A sampler given to a trainer is recorded by its class and its own constructor arguments (the samplers record
theirs the same way, :mod:`fastood._hyperparameters`), so ``sampler=LangevinSampler(step_size=0.05)`` against a
checkpoint written with the default 0.1 is a mismatch too.
The record is stored in each checkpoint; resuming refuses with a message naming the difference when the method
(trainer class), a recorded hyperparameter or the model's parameter/buffer names and shapes differ.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastood._hyperparameters import RUN_SETTINGS, RecordsHyperparameters  # noqa: F401 (re-exported)

__all__ = ["RecordsHyperparameters", "RUN_SETTINGS", "ResumeMismatch", "ResumeWarning", "Resumed", "method_name",
           "check_compatible"]

class ResumeMismatch(ValueError):
    """The checkpoint was written by a different method, with other hyperparameters, or for another model."""


class ResumeWarning(UserWarning):
    """A :meth:`~fastood.trainers.base.Trainer.fit` continued from the checkpoint in its ``checkpoint_dir`` instead
    of starting afresh (``resume="auto"``, the default): the model's weights were replaced by the checkpoint's, and
    only the steps left of the budget are trained (none when the checkpoint holds the whole budget). Warned whatever
    ``progress`` is; silence it with ``warnings.filterwarnings("ignore", category=fastood.ResumeWarning)`` when
    resuming is what you want."""


class Resumed(NamedTuple):
    """``trainer.resumed`` after :meth:`fit` continued from a checkpoint (None when it started afresh)."""

    path: str
    step: int
    total_steps: int


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


def _first_difference(name, saved, mine):
    """(what, saved value, my value) of the first difference; a sampler's record ``(class, (arg, value), ...)``
    is compared argument by argument, so the message names ``sampler.step_size`` rather than two long tuples."""
    def as_record(v):
        if isinstance(v, tuple) and v and isinstance(v[0], str) and all(
                isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in v[1:]):
            return v[0], dict(v[1:])
        return None
    a, b = as_record(saved), as_record(mine)
    if a is None or b is None:
        return name, saved, mine
    if a[0] != b[0]:
        return f"{name} class", a[0], b[0]
    for key in sorted(set(a[1]) | set(b[1])):
        if a[1].get(key) != b[1].get(key):
            return f"{name}.{key}", a[1].get(key), b[1].get(key)
    return name, saved, mine


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
                what, theirs_value, my_value = _first_difference(name, saved[name], mine[name])
                raise ResumeMismatch(f"checkpoint {path} was written with {what}={theirs_value!r}, but this trainer "
                                     f"has {what}={my_value!r}" + hint)
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
