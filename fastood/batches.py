"""What a loader's batch holds: the one place fastood turns a user's batch into ``(images, labels)``.

Trainers, detectors and :func:`fastood.evaluation.evaluate` read batches through a :class:`BatchReader`, so
every loader form works everywhere and every mistake gets the same clear message:

- a tensor ``images`` [B, C, H, W] (images only);
- a tuple or list ``(images, labels, ...)`` (what ``TensorDataset`` and torchvision datasets give);
- a dict with an image key and a label key, found among :data:`IMAGE_KEYS` / :data:`LABEL_KEYS`
  (``{"image": x, "label": y}``, ``{"pixel_values": x, "labels": y}``, ...), or named with
  ``batch_keys=("img", "cls")``;
- anything else through ``batch_fn=lambda batch: (images, labels)`` (or ``-> images``).

This module imports nothing else from fastood, so every subpackage can use it (it also holds
:func:`model_device`, once in ``fastood.trainers.base``).
"""
import torch
from torch import nn

#: Dict keys tried, in this order, for the images and the labels of a dict batch.
IMAGE_KEYS = ("image", "images", "img", "imgs", "x", "input", "inputs", "pixel_values", "data")
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "cls")

_FORMS = ("expected (images, labels) tuples/lists, images alone (a tensor), or dicts with an image key "
          f"({', '.join(IMAGE_KEYS[:4])}, ...) and a label key ({', '.join(LABEL_KEYS[:4])}, ...); "
          "for other batches pass batch_keys=(image_key, label_key) or batch_fn=lambda batch: (images, labels)")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a module without either)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def first_item(batch):
    """The image batch of a loader item: a tensor, or the first item of a tuple/list (kept for old callers; new
    code uses :class:`BatchReader`, which also reads dict batches)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def describe(value) -> str:
    """A short description of what a loader yielded, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


def check_loader(loader, name: str = "loader"):
    """Refuse what is not an iterable of batches, above all a Dataset passed where a DataLoader belongs (its items
    are single images, which reach the model as 3-D tensors). Returns ``loader``."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(loader, Dataset) and not isinstance(loader, DataLoader):
        raise TypeError(f"{name} must be a DataLoader (an iterable of batches), got the dataset "
                        f"{type(loader).__name__}: wrap it, e.g. torch.utils.data.DataLoader(dataset, batch_size=64, "
                        "shuffle=True)")
    if isinstance(loader, torch.Tensor):
        raise TypeError(f"{name} must be a DataLoader (an iterable of batches), got a tensor of shape "
                        f"{tuple(loader.shape)}: wrap it, e.g. DataLoader(TensorDataset(images, labels), batch_size=64)")
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{name} must be a DataLoader (an iterable of batches), got {type(loader).__name__}")
    return loader


class BatchReader:
    """Reads images and labels from batches of any supported form (see the module docstring).

    Args:
        batch_fn: ``batch -> (images, labels)`` or ``batch -> images``; overrides everything else.
        batch_keys: ``(image_key, label_key)`` of dict batches (``label_key`` may be None), or just the image key.
    """

    def __init__(self, batch_fn=None, batch_keys=None):
        if batch_fn is not None and batch_keys is not None:
            raise ValueError("give batch_fn or batch_keys, not both")
        if batch_fn is not None and not callable(batch_fn):
            raise TypeError(f"batch_fn must be a callable batch -> (images, labels), got {type(batch_fn).__name__}")
        if batch_keys is not None:
            keys = (batch_keys,) if isinstance(batch_keys, str) else tuple(batch_keys)
            if not 1 <= len(keys) <= 2:
                raise ValueError(f"batch_keys must be (image_key, label_key) or an image key, got {batch_keys!r}")
            batch_keys = keys + (None,) * (2 - len(keys))
        self.batch_fn, self.batch_keys = batch_fn, batch_keys

    def __repr__(self):
        return f"BatchReader(batch_fn={self.batch_fn!r}, batch_keys={self.batch_keys!r})"

    # --------------------------------------------------------------------------------------------- reading
    def split(self, batch, where: str = "loader"):
        """``(images, labels or None)`` of one batch; images is a floating tensor [B, ...]."""
        if self.batch_fn is not None:
            out = self.batch_fn(batch)
            images, labels = (out[0], out[1] if len(out) > 1 else None) if isinstance(out, (tuple, list)) else (out, None)
            source = f"{where} (through batch_fn, which returned {describe(out)})"
        elif isinstance(batch, dict):
            images, labels = self._from_dict(batch, where)
            source = where
        elif isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise ValueError(f"{where} yielded an empty {type(batch).__name__}; {_FORMS}")
            images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
            source = where
        else:
            images, labels, source = batch, None, where
        if not isinstance(images, torch.Tensor) or images.dim() < 2 or not images.is_floating_point():
            raise TypeError(f"{source} yielded {describe(batch)}: its images are {describe(images)}, not a floating-"
                            f"point batch [B, C, H, W]; {_FORMS}")
        if labels is not None and not isinstance(labels, torch.Tensor):
            try:
                labels = torch.as_tensor(labels)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"{source} yielded labels that are {describe(labels)}, not class indices; "
                                f"{_FORMS}") from None
        return images, labels

    def images(self, batch, where: str = "loader") -> torch.Tensor:
        """The image batch [B, ...] of one batch."""
        return self.split(batch, where)[0]

    def images_labels(self, batch, where: str = "loader"):
        """``(images [B, ...], labels [B] long)``; a clear error when the batch has no class labels."""
        images, labels = self.split(batch, where)
        if labels is None:
            raise ValueError(f"{where} yielded {describe(batch)} without labels, but class labels are needed here: "
                             f"{_FORMS}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{where}: labels must be integer class indices, got {describe(labels)} (one-hot or soft "
                            "labels are not supported; pass batch_fn=lambda b: (b[0], b[1].argmax(1)))")
        labels = labels.reshape(-1) if labels.dim() > 1 and labels.numel() == images.shape[0] else labels
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{where}: a batch has {images.shape[0]} images but labels of shape {tuple(labels.shape)} "
                             "(expected one class index per image)")
        return images, labels

    def _from_dict(self, batch: dict, where: str):
        if self.batch_keys is not None:
            image_key, label_key = self.batch_keys
            missing = [k for k in (image_key, label_key) if k is not None and k not in batch]
            if missing:
                raise KeyError(f"{where} yielded a dict with keys {sorted(map(str, batch))}, without the batch_keys "
                               f"{missing}")
            return batch[image_key], (batch[label_key] if label_key is not None else None)
        image_key = next((k for k in IMAGE_KEYS if k in batch), None)
        if image_key is None:
            raise KeyError(f"{where} yielded a dict with keys {sorted(map(str, batch))}: none is a known image key; "
                           f"pass batch_keys=(image_key, label_key) or batch_fn=...; {_FORMS}")
        label_key = next((k for k in LABEL_KEYS if k in batch), None)
        return batch[image_key], (batch[label_key] if label_key is not None else None)

    # --------------------------------------------------------------------------------------------- loaders
    def labeled(self, loader, where: str = "loader") -> "ReadLoader":
        """``loader`` yielding ``(images, labels)`` tuples (len() and ``sampler`` passed through)."""
        return ReadLoader(check_loader(loader, where), self, where, labeled=True)

    def unlabeled(self, loader, where: str = "loader") -> "ReadLoader":
        """``loader`` yielding ``(images, labels or None)`` tuples."""
        return ReadLoader(check_loader(loader, where), self, where, labeled=False)


class ReadLoader:
    """A loader seen through a :class:`BatchReader`: yields ``(images, labels)`` tuples (labels may be None when
    ``labeled`` is False). Everything else (``len()``, ``sampler``, ``dataset``, ``batch_size``) is the loader's."""

    def __init__(self, loader, reader: BatchReader, where: str, labeled: bool):
        self.loader, self.reader, self.where, self.labeled = loader, reader, where, labeled

    def __iter__(self):
        read = self.reader.images_labels if self.labeled else self.reader.split
        for batch in self.loader:
            yield read(batch, self.where)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        if name in ("loader", "reader", "where", "labeled"):  # not set yet (copy/pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def as_reader(batch_fn=None, batch_keys=None) -> BatchReader:
    """A :class:`BatchReader` (validating the two options)."""
    return BatchReader(batch_fn=batch_fn, batch_keys=batch_keys)


def check_device(device) -> torch.device:
    """``device`` as a torch.device; a clear error for a CUDA device on a machine without one (or without that
    index), instead of the driver's message at the first tensor moved there."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r} ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


__all__ = ["BatchReader", "ReadLoader", "IMAGE_KEYS", "LABEL_KEYS", "as_reader", "check_device", "check_loader",
           "describe", "first_item", "model_device"]
