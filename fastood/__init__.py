"""fastood: fast out-of-distribution-aware training for image classifiers.

Submodules are imported on first use, so ``import fastood`` stays cheap:

- :mod:`fastood.ops`         fused ops (native C++/CUDA with a pure-PyTorch reference)
- :mod:`fastood.metrics`     AUROC, AUPR, FPR@95TPR, detection error
- :mod:`fastood.detectors`   OOD scores (higher = more OOD)
- :mod:`fastood.samplers`    outlier generators (Langevin, manifold, class-mix, noise)
- :mod:`fastood.models`      reference networks and heads
- :mod:`fastood.trainers`    one trainer per method
- :mod:`fastood.objectives`  each method's training step as a piece for your own loop (the trainers loop over them)
- :mod:`fastood.losses`      every method's loss as a function on tensors
- :mod:`fastood.data`        offline data, synthetic OOD sets, torchvision adapters
- :mod:`fastood.evaluation`  run detectors over ID/OOD sets and report
- :mod:`fastood.batches`     how batches are read (tuples, dicts, ``batch_fn``)

:func:`save_model` writes a model file ``fastood eval`` reads. For your own training loop (or a LightningModule):
the objectives (``FIGObjective``, ``GaussianNoiseObjective``, ``OEObjective``, ``EnergyOEObjective``,
``ICEObjective``, ``ManifoldObjective``, ``CMGObjective``, ``DiscrepancyObjective``),
:func:`frozen_batchnorm` and :func:`check_data_range`, all importable from ``fastood`` itself. Warning classes:
:class:`DataRangeWarning`, :class:`ResumeWarning`, :class:`ModelReplacedWarning`, :class:`AmpIgnoredWarning`.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "ops", "metrics", "detectors", "samplers", "models", "trainers", "data", "evaluation",
    "distributed", "cli", "batches", "model_files", "objectives", "losses", "outlier_sources", "data_range",
)

#: names importable from ``fastood`` itself -> the module that defines them (imported on first use)
_NAMES = {
    **{name: "fastood.objectives" for name in (
        "Objective", "OutlierObjective", "FIGObjective", "GaussianNoiseObjective", "OEObjective", "EnergyOEObjective",
        "ICEObjective", "ManifoldObjective", "CMGObjective", "DiscrepancyObjective")},
    "frozen_batchnorm": "fastood._modes",
    "check_data_range": "fastood.data_range",
    "DataRangeWarning": "fastood.data_range",
    "ResumeWarning": "fastood.trainers.resume",
    "ModelReplacedWarning": "fastood.trainers.base",
    "AmpIgnoredWarning": "fastood.trainers.base",
}

__all__ = list(_SUBMODULES) + list(_NAMES) + ["__version__", "save_model"]


def save_model(model, path, /, **meta):
    """Write ``model`` and ``meta`` to ``path`` for ``fastood eval`` (:func:`fastood.model_files.save_model`)."""
    from fastood.model_files import save_model as save

    return save(model, path, **meta)


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastood' has no attribute {name!r}")
