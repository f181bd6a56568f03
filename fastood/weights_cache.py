"""Trained weights kept in a cache directory (the demo's and ``pretrained_small_cnn``'s pretrained models).

Written like a trainer checkpoint (:func:`fastood.trainers.checkpoint.save_checkpoint_file`: checked finite,
written to a temporary file with a SHA-256 in the zip comment, fsynced, renamed into place), so an interrupted
write or a diverged training never leaves a broken file where a good one is expected. Read back with the
checksum verified: a damaged cache file is reported and treated as missing (the caller trains again) instead of
failing with an unpickling error -- or, worse, loading garbage. The files stay plain ``torch.save`` state dicts:
``torch.load(path, weights_only=True)`` opens them.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .trainers.checkpoint import (CheckpointError, NonFiniteStateError, describe_non_finite, first_non_finite,
                                  save_checkpoint_file, verify_checkpoint_file)

__all__ = ["save_cached_weights", "load_cached_weights"]


def save_cached_weights(model: nn.Module, path) -> None:
    """Write ``model.state_dict()`` to ``path`` safely. Raises :class:`NonFiniteStateError` (naming the tensor)
    when the weights hold NaN/inf -- a diverged training is not cached -- and :class:`CheckpointError` when the
    file cannot be written (an existing ``path`` is then left as it was)."""
    state = model.state_dict()
    bad = first_non_finite(state.items())
    if bad is not None:
        name, value = bad
        raise NonFiniteStateError(f"not caching the weights in {path}: {name} holds {describe_non_finite(value)} "
                                  "(the training diverged; lower the learning rate or check the data)", name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint_file(state, path)


def load_cached_weights(model: nn.Module, path) -> bool:
    """Load ``path`` into ``model`` when it exists and is intact; True when loaded. A damaged file (failed
    checksum, truncated, not a state dict of this model) gives a warning naming it and the cause, is removed,
    and False is returned, so the caller trains again."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return False
    try:
        verify_checkpoint_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else None
        if found != expected:  # checked before loading: a failed load_state_dict may have copied some tensors
            raise ValueError("not a state dict of this model (other tensor names or shapes)")
        model.load_state_dict(state)
    except (CheckpointError, RuntimeError, EOFError, OSError, ValueError) as exc:
        warnings.warn(f"ignoring the damaged cache file {path} ({type(exc).__name__}: {exc}); training again",
                      stacklevel=2)
        try:
            os.remove(path)
        except OSError:
            pass
        return False
    return True
