"""Model files ``fastood eval`` reads: fastood's own, a ``torch.save(model)`` file, or a state_dict with a factory.

    fastood.save_model(model, "model.pt", data="digits-0to4", detector="energy")   # any metadata you like
    fastood.save_model(model, "model.pt", mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), image_shape=(3, 32, 32))
    payload = load_model("model.pt")                     # {"module": nn.Module, "method": ..., ...}
    payload = load_model("weights.pt", factory="mypkg.models:make_net")           # a state_dict

These files hold pickled modules: load only files you trust (``torch.load(weights_only=False)``).
"""
import copy
import importlib
import os
import sys

import torch
from torch import nn

MODEL_FORMAT = "fastood-model"
#: keys fastood itself reads from a model file; ``save_model``'s metadata may set them
KNOWN_META = ("method", "data", "model", "seed", "detector", "image_shape", "num_classes", "mean", "std")
_RESERVED = ("format", "version", "module")


class ModelFileError(ValueError):
    """A model file that cannot be used (missing, unreadable, of an unknown kind); the message names the file and
    what would make it work. The CLI prints it as one ``fastood: error:`` line."""


def save_model(model: nn.Module, path, /, **meta) -> str:
    """Write ``model`` (a copy on the CPU in eval mode, unwrapped from DDP) with ``meta`` to ``path``, atomically, in
    the format ``fastood eval`` reads. Useful metadata: ``data`` (the built-in benchmark to evaluate on),
    ``detector`` (``fastood eval``'s default detector), ``image_shape`` (``(C, H, W)``: ``fastood eval`` on image
    folders reads them with C channels at H x W), ``mean`` and ``std`` (the input normalization ``(x - mean) / std``
    from pixels in [0, 1], one number or one per channel: ``fastood eval`` on image folders applies it),
    ``num_classes``, ``method``; any other picklable values are kept too. Returns ``path``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    clash = sorted(set(meta) & set(_RESERVED))
    if clash:
        raise ValueError(f"save_model: metadata keys {clash} are reserved ({', '.join(_RESERVED)})")
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    module = copy.deepcopy(module).cpu().eval()
    if meta.get("image_shape") is not None:
        meta["image_shape"] = tuple(int(s) for s in meta["image_shape"])
    if (meta.get("mean") is None) != (meta.get("std") is None):
        raise ValueError("save_model: give both mean and std (the model's input normalization), or neither")
    if meta.get("mean") is not None:
        from fastood.data.normalization import _values, bounds_for

        bounds_for(meta["mean"], meta["std"])  # validates them: positive std, matching lengths
        meta["mean"], meta["std"] = tuple(_values("mean", meta["mean"])), tuple(_values("std", meta["std"]))
    payload = dict({k: None for k in KNOWN_META}, **meta, format=MODEL_FORMAT, version=1, module=module)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _import_factory(spec: str):
    """``"package.module:callable"`` -> the callable (the current directory is importable, as for ``python -m``)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ModelFileError(f"--model must be MODULE:FACTORY (e.g. mypkg.models:make_net, a function returning the "
                             f"untrained nn.Module), got {spec!r}")
    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelFileError(f"--model {spec}: cannot import {module_name!r} ({err}); run from the folder holding it "
                             "or put it on PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise ModelFileError(f"--model {spec}: {module_name} has no callable {attr!r}")
    return factory


def _state_dict_of(obj):
    """The state_dict inside ``obj`` (a state_dict, ``{"state_dict": ...}``, ``{"model": ...}`` of a trainer
    checkpoint or of common training scripts), or None."""
    def is_state_dict(d):
        return isinstance(d, dict) and d and all(isinstance(k, str) for k in d) and all(
            isinstance(v, torch.Tensor) for v in d.values())

    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if is_state_dict(obj.get(key)):
                return obj[key]
    return None


def load_model(path, factory=None) -> dict:
    """Read a model file of any supported kind. Returns the payload dict: ``module`` (an ``nn.Module`` on the CPU,
    eval mode) and the metadata keys :data:`KNOWN_META` (None where the file does not say).

    Kinds: a file of :func:`save_model` (or ``fastood train`` / ``demo``); a ``torch.save(model)`` file; a
    state_dict (also inside ``{"state_dict": ...}``, ``{"model": ...}``, or a trainer checkpoint) with ``factory``,
    ``"module:callable"`` or a callable returning the untrained module. Raises :class:`ModelFileError`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file not found: {path!r} (fastood train writes OUT/model.pt, fastood demo writes "
                             "OUT/models/METHOD.pt; fastood.save_model(model, path) writes one from Python)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickling, zip and I/O errors all mean the same to the user
        raise ModelFileError(f"cannot read {path!r} as a torch file: {type(err).__name__}: {err}") from None
    meta = {k: None for k in KNOWN_META}
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        module = obj.get("module")
        if not isinstance(module, nn.Module):
            raise ModelFileError(f"{path!r} is a fastood model file without a module")
        return dict(meta, **obj)
    if isinstance(obj, nn.Module):
        return dict(meta, format=MODEL_FORMAT, module=obj.eval(), kind="torch.save(model)")
    checkpoint = isinstance(obj, dict) and "optimizer" in obj
    hint = (" It looks like a trainer checkpoint (checkpoint.pt): use the model.pt written beside the run's report"
            + (", or pass --model MODULE:FACTORY to rebuild the model from its 'model' entry" if checkpoint
               and _state_dict_of(obj) is not None else "") + "." if checkpoint else "")
    state = _state_dict_of(obj)
    if state is None:
        raise ModelFileError(f"{path!r} is not a fastood model file: it holds a {type(obj).__name__}, not a model "
                             "(expected a file of fastood.save_model / fastood train, a torch.save(model) file, or a "
                             f"state_dict with --model MODULE:FACTORY).{hint}")
    if factory is None:
        raise ModelFileError(f"{path!r} holds a state_dict (weights without the model's code): pass --model "
                             "MODULE:FACTORY, a function returning the untrained nn.Module (e.g. --model "
                             "mypkg.models:make_net), or save the whole model with fastood.save_model(model, path)."
                             f"{hint}")
    build = _import_factory(factory) if isinstance(factory, str) else factory
    module = build()
    if not isinstance(module, nn.Module):
        raise ModelFileError(f"the factory {factory!r} returned {type(module).__name__}, not an nn.Module")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ModelFileError(f"the state_dict in {path!r} does not fit the model built by {factory!r}: "
                             f"{' '.join(line.strip() for line in first[:3])}") from None
    return dict(meta, format=MODEL_FORMAT, module=module.eval(), kind="state_dict")


__all__ = ["MODEL_FORMAT", "ModelFileError", "load_model", "save_model"]
