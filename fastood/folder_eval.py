"""``fastood eval MODEL --id DIR --ood DIR ...``: score a model on image folders instead of a built-in benchmark.

The ID folder and each OOD folder hold image files in any layout (labels are not read, so the report has no ID
accuracy). Images are resized to ``--size`` (default: the model file's image size, else each file's own), converted
to ``--channels`` and normalized with ``--mean``/``--std`` as the model was trained (default: fastood's [-1, 1]).
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

# detectors that need ID training data or a validation split: not available on bare folders
def _needs_training_data(name: str) -> bool:
    """Whether detector ``name`` must be fitted on ID training data (its class overrides ``Detector.fit``)."""
    from fastood.detectors import DETECTORS, Detector

    return name in DETECTORS and DETECTORS[name].fit is not Detector.fit


def folder_loaders(id_dir, ood_dirs, *, size=None, channels=3, mean=None, std=None, batch_size=256):
    """``(id_loader, {name: ood_loader})`` over image folders (images only). OOD sets are named by their folder
    (``name=DIR`` names one explicitly)."""
    from fastood.data.vision import images_in

    def load(path):
        return DataLoader(images_in(path, size=size, channels=channels, mean=mean, std=std), batch_size=batch_size)

    ood = {}
    for spec in ood_dirs:
        name, path = spec.split("=", 1) if "=" in spec and not os.path.isdir(spec) else (None, spec)
        name = name or os.path.basename(os.path.normpath(path)) or path
        unique, k = name, 2
        while unique in ood:
            unique, k = f"{name}-{k}", k + 1
        ood[unique] = load(path)
    return load(id_dir), ood


def _first_batch_check(detector, loader, where):
    """Score one batch first, so a model/detector mismatch or images of mixed sizes fail before the full run with a
    message naming the folder."""
    try:
        batch = next(iter(loader))
    except RuntimeError as err:  # default_collate: images of different sizes
        raise ValueError(f"{where}: the images cannot be batched ({err}); pass --size N to resize them") from None
    detector.score(batch[0][:2])


def run_eval_folders(payload: dict, id_dir: str, ood_dirs, *, detector="auto", size=None, channels=None, mean=None,
                     std=None, batch_size=256, device="auto", out=None, progress=True, plots=True, model_file=None):
    """Evaluate ``payload["module"]`` (from :func:`fastood.model_files.load_model`) with one detector on image
    folders; print the table and write the report folder. Returns the Report."""
    from fastood.batches import check_device
    from fastood.demo import write_report
    from fastood.detectors import DETECTORS, ODIN
    from fastood.evaluation import evaluate

    shape = payload.get("image_shape")
    if size is None and shape is not None:
        size = int(shape[-1])
    if channels is None:
        channels = int(shape[0]) if shape is not None else 3
    name = (payload.get("detector") or "msp") if detector == "auto" else detector
    if _needs_training_data(name):
        raise ValueError(f"--detector {name} is fitted on labeled ID training data, which image folders do not "
                         f"give; use the Python API (fastood.detectors.{DETECTORS[name].__name__}(model)"
                         ".fit(train_loader)) or "
                         "another detector")
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid detectors: {', '.join(DETECTORS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else check_device(device)
    model = payload["module"].to(device).eval()
    det = ODIN(model, std=std) if name == "odin" and std is not None else DETECTORS[name](model)
    id_loader, ood = folder_loaders(id_dir, ood_dirs, size=size, channels=channels, mean=mean, std=std,
                                    batch_size=batch_size)
    _first_batch_check(det, id_loader, f"--id {id_dir}")
    report = evaluate(det, id_loader, ood, progress=progress, batch_fn=lambda batch: batch[0])
    out = out or os.path.join(os.path.dirname(os.path.abspath(model_file or ".")), f"eval-{name}")
    meta = {"command": "eval", "model_file": None if model_file is None else os.path.abspath(model_file),
            "id": os.path.abspath(id_dir), "ood": {k: v.dataset.root for k, v in ood.items()},
            "size": size, "channels": channels, "mean": mean, "std": std, "device": str(device),
            "torch": torch.__version__}
    write_report(out, {f"{payload.get('method') or 'model'} / {det.name}": report}, meta, {}, plots=plots)
    print(report.table())
    print(f"\nreport: {os.path.abspath(out)}")
    return report


__all__ = ["folder_loaders", "run_eval_folders"]
