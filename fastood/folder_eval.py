"""``fastood eval MODEL --id DIR --ood DIR ...``: score a model on image folders instead of a built-in benchmark.

The ID folder and each OOD folder hold image files in any layout (labels are not read, so the report has no ID
accuracy). How the images are read, each setting from the first source that gives it (the report's ``inputs`` says
which one did):

- ``size``: ``--size``, else the model file's ``image_shape``, else each file's own (they must then agree).
- ``channels``: ``--channels``, else the model file's ``image_shape``, else the in_channels of the model's first
  ``nn.Conv2d`` (the first one it registers), else 3.
- normalization: ``--mean``/``--std``, else the model file's ``mean``/``std`` (``save_model(..., mean=, std=)``),
  else fastood's [-1, 1]: silently for a model trained on a built-in benchmark (they are in [-1, 1]), with a
  :class:`NormalizationWarning` otherwise (a model trained on normalized images then scores inputs in the wrong
  range without any error).

An unreadable image stops the run with an error naming the file and ``--skip-bad-images``; with it, unreadable files
are skipped, counted and named in the report (``skipped_images``). Every folder's first batch is scored before the
full run, so images of mixed sizes or a model that does not fit them fail early with a message naming the folder.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch.utils.data import DataLoader

# detectors that need ID training data or a validation split: not available on bare folders
def _needs_training_data(name: str) -> bool:
    """Whether detector ``name`` must be fitted on ID training data (its class overrides ``Detector.fit``)."""
    from fastood.detectors import DETECTORS, Detector

    return name in DETECTORS and DETECTORS[name].fit is not Detector.fit


class NormalizationWarning(UserWarning):
    """``fastood eval`` on image folders was given no normalization (no ``--mean``/``--std``, none in the model file)
    and assumes fastood's [-1, 1]."""


def first_conv(module):
    """``(name, in_channels)`` of the first ``nn.Conv2d`` that ``module`` registers (its input stem in the usual
    layouts), or ``(None, None)`` when it has none."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            return name, int(m.in_channels)
    return None, None


def infer_inputs(payload: dict, *, size=None, channels=None, mean=None, std=None) -> dict:
    """How to read image folders for ``payload`` (from :func:`fastood.model_files.load_model`): ``{"size",
    "channels", "mean", "std", "sources": {"size", "channels", "normalization"}}``, each value from the options if
    given, else the model file's metadata, else the model (channels) or fastood's defaults (see the module
    docstring). Warns :class:`NormalizationWarning` when the normalization is assumed."""
    from fastood.data.benchmarks import BENCHMARKS

    sources = {}
    shape = payload.get("image_shape")
    if size is not None:
        sources["size"] = "--size"
    elif shape is not None:
        size, sources["size"] = int(shape[-1]), "model file (image_shape)"
    else:
        sources["size"] = "each file's own"
    conv_name, conv_channels = first_conv(payload["module"])
    if channels is not None:
        sources["channels"] = "--channels"
    elif shape is not None:
        channels, sources["channels"] = int(shape[0]), "model file (image_shape)"
    elif conv_channels is not None:
        if conv_channels not in (1, 3):
            raise ValueError(f"the model's first convolution {conv_name!r} takes {conv_channels} channels, but image "
                             "folders are read as 1 (grayscale) or 3 (RGB) channels; pass --channels if the model "
                             "takes its input elsewhere")
        channels, sources["channels"] = conv_channels, f"the model's first convolution ({conv_name})"
    else:
        channels, sources["channels"] = 3, "default (the model has no nn.Conv2d to read it from)"
    if (mean is None) != (std is None):
        raise ValueError("give both --mean and --std (the model's input normalization), or neither")
    if mean is not None:
        sources["normalization"] = "--mean/--std"
    elif payload.get("mean") is not None and payload.get("std") is not None:
        mean, std = list(payload["mean"]), list(payload["std"])
        sources["normalization"] = "model file (mean/std)"
    elif payload.get("data") in BENCHMARKS:
        sources["normalization"] = f"fastood's [-1, 1] (the model was trained on {payload['data']})"
    else:
        sources["normalization"] = "fastood's [-1, 1] (assumed: no --mean/--std, none in the model file)"
        warnings.warn(
            "fastood eval: no --mean/--std given and the model file records no normalization, so the images are "
            "mapped to fastood's [-1, 1]; a model trained on images normalized otherwise (e.g. ImageNet's mean/std) "
            "then scores inputs in the wrong range and the metrics are meaningless. Pass --mean/--std, or save the "
            "model with fastood.save_model(model, path, mean=..., std=...)", NormalizationWarning, stacklevel=2)
    return {"size": size, "channels": channels, "mean": mean, "std": std, "sources": sources}


class _Collate:
    """Batches of ``(x, -1)`` items: drops the None of skipped unreadable files (None for a batch of them only) and
    turns torch's "stack expects each tensor to be equal size" into an error naming the folder, the sizes and
    ``--size``."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, items):
        from torch.utils.data import default_collate

        items = [item for item in items if item is not None]
        if not items:
            return None
        shapes = sorted({tuple(x.shape) for x, _ in items})
        if len(shapes) > 1:
            raise ValueError(f"{self.where}: the images cannot be batched, they have different sizes "
                             f"({', '.join('x'.join(map(str, s[1:])) for s in shapes[:4])}"
                             f"{', ...' if len(shapes) > 4 else ''}); pass --size N to resize them to N x N")
        return default_collate(items)


class FolderBatches:
    """The batches of one image folder (a DataLoader over :func:`fastood.data.vision.images_in`), without the empty
    ones that skipped files leave. Attributes: ``dataset`` (its ``bad`` lists the skipped files), ``where`` (the
    option that named the folder, for messages)."""

    def __init__(self, loader: DataLoader, where: str):
        self.loader, self.dataset, self.where = loader, loader.dataset, where

    def __iter__(self):
        return (batch for batch in self.loader if batch is not None)

    def __len__(self):
        return len(self.loader)


def folder_loaders(id_dir, ood_dirs, *, size=None, channels=3, mean=None, std=None, batch_size=256,
                   skip_bad=False):
    """``(id_batches, {name: ood_batches})`` (:class:`FolderBatches`) over image folders (images only). OOD sets
    are named by their folder (``name=DIR`` names one explicitly). ``skip_bad``: skip unreadable files (listed in
    each loader's ``dataset.bad``) instead of stopping at the first."""
    from fastood.data.vision import images_in

    def load(path, where):
        dataset = images_in(path, size=size, channels=channels, mean=mean, std=std, skip_bad=skip_bad)
        return FolderBatches(DataLoader(dataset, batch_size=batch_size, collate_fn=_Collate(where)), where)

    ood = {}
    for spec in ood_dirs:
        name, path = spec.split("=", 1) if "=" in spec and not os.path.isdir(spec) else (None, spec)
        name = name or os.path.basename(os.path.normpath(path)) or path
        unique, k = name, 2
        while unique in ood:
            unique, k = f"{name}-{k}", k + 1
        ood[unique] = load(path, f"--ood {spec}")
    return load(id_dir, f"--id {id_dir}"), ood


def _first_batch_check(detector, batches: FolderBatches, inputs: dict, conv=(None, None)):
    """Read and score one batch of a folder first, so images of mixed sizes or a model that does not fit them fail
    before the full run with a message naming the folder and the options to change."""
    batch = next(iter(batches), None)
    if batch is None:
        bad = batches.dataset.bad
        raise ValueError(f"{batches.where}: none of its {len(batches.dataset)} image(s) could be read"
                         + (f" (first: {bad[0][0]}: {bad[0][1]})" if bad else ""))
    x = batch[0][:2]
    try:
        detector.score(x)
    except RuntimeError as err:
        name, channels = conv
        hint = (f"; the model's first convolution ({name}) takes {channels} channel(s)" if name is not None else "")
        size = inputs["size"] or "of the files"
        raise ValueError(
            f"{batches.where}: the model cannot score these images (a batch of shape {list(x.shape)}, read with "
            f"{inputs['channels']} channel(s) [{inputs['sources']['channels']}], size {size}){hint}: "
            f"{' '.join(str(err).split())[:400]}. Check --channels, --size and --mean/--std") from None


def run_eval_folders(payload: dict, id_dir: str, ood_dirs, *, detector="auto", size=None, channels=None, mean=None,
                     std=None, batch_size=256, device="auto", out=None, progress=True, plots=True, model_file=None,
                     skip_bad=False):
    """Evaluate ``payload["module"]`` (from :func:`fastood.model_files.load_model`) with one detector on image
    folders; print the table and write the report folder. Size, channels and normalization not given are inferred
    (:func:`infer_inputs`). ``skip_bad``: skip unreadable images, counted and named in the report. Returns the
    Report."""
    from fastood.batches import check_device
    from fastood.demo import write_report
    from fastood.detectors import DETECTORS, ODIN
    from fastood.evaluation import evaluate

    name = (payload.get("detector") or "msp") if detector == "auto" else detector
    if _needs_training_data(name):
        raise ValueError(f"--detector {name} is fitted on labeled ID training data, which image folders do not "
                         f"give; use the Python API (fastood.detectors.{DETECTORS[name].__name__}(model)"
                         ".fit(train_loader)) or "
                         "another detector")
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid detectors: {', '.join(DETECTORS)}")
    inputs = infer_inputs(payload, size=size, channels=channels, mean=mean, std=std)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else check_device(device)
    model = payload["module"].to(device).eval()
    std = inputs["std"]
    det = ODIN(model, std=std) if name == "odin" and std is not None else DETECTORS[name](model)
    id_batches, ood = folder_loaders(id_dir, ood_dirs, size=inputs["size"], channels=inputs["channels"],
                                     mean=inputs["mean"], std=std, batch_size=batch_size, skip_bad=skip_bad)
    conv = first_conv(model)
    for batches in [id_batches, *ood.values()]:
        _first_batch_check(det, batches, inputs, conv)
    report = evaluate(det, id_batches, ood, progress=progress, batch_fn=lambda batch: batch[0])
    listed = lambda dataset: [{"file": f, "error": e} for f, e in sorted(set(dataset.bad))]  # noqa: E731
    skipped = {"id": listed(id_batches.dataset), "ood": {k: listed(v.dataset) for k, v in ood.items()}}
    count = len(skipped["id"]) + sum(len(v) for v in skipped["ood"].values())
    out = out or os.path.join(os.path.dirname(os.path.abspath(model_file or ".")), f"eval-{name}")
    meta = {"command": "eval", "model_file": None if model_file is None else os.path.abspath(model_file),
            "id": os.path.abspath(id_dir), "ood": {k: v.dataset.root for k, v in ood.items()},
            "size": inputs["size"], "channels": inputs["channels"], "mean": inputs["mean"], "std": std,
            "inputs": inputs["sources"], "skip_bad_images": bool(skip_bad),
            "skipped_images": dict(count=count, **skipped),
            "device": str(device), "torch": torch.__version__}
    write_report(out, {f"{payload.get('method') or 'model'} / {det.name}": report}, meta, {}, plots=plots)
    print(report.table())
    if count:
        named = [f"{item['file']} ({item['error']})" for v in [skipped["id"], *skipped["ood"].values()] for item in v]
        print(f"\nskipped {count} unreadable image(s): {'; '.join(named[:10])}{'; ...' if count > 10 else ''}")
    print(f"\nreport: {os.path.abspath(out)}")
    return report


__all__ = ["FolderBatches", "NormalizationWarning", "first_conv", "folder_loaders", "infer_inputs",
           "run_eval_folders"]
