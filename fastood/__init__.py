"""fastood: fast out-of-distribution-aware training for image classifiers.

Submodules are imported on first use, so ``import fastood`` stays cheap:

- :mod:`fastood.ops`         fused ops (native C++/CUDA with a pure-PyTorch reference)
- :mod:`fastood.metrics`     AUROC, AUPR, FPR@95TPR, detection error
- :mod:`fastood.detectors`   OOD scores (higher = more OOD)
- :mod:`fastood.samplers`    outlier generators (Langevin, manifold, class-mix, noise)
- :mod:`fastood.models`      reference networks and heads
- :mod:`fastood.trainers`    one trainer per method
- :mod:`fastood.data`        offline data, synthetic OOD sets, torchvision adapters
- :mod:`fastood.evaluation`  run detectors over ID/OOD sets and report
- :mod:`fastood.batches`     how batches are read (tuples, dicts, ``batch_fn``)

:func:`save_model` writes a model file ``fastood eval`` reads.
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "ops", "metrics", "detectors", "samplers", "models", "trainers", "data", "evaluation",
    "distributed", "cli", "batches", "model_files",
)

__all__ = list(_SUBMODULES) + ["__version__", "save_model"]


def save_model(model, path, /, **meta):
    """Write ``model`` and ``meta`` to ``path`` for ``fastood eval`` (:func:`fastood.model_files.save_model`)."""
    from fastood.model_files import save_model as save

    return save(model, path, **meta)


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'fastood' has no attribute {name!r}")
