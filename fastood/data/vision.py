"""torchvision adapters for data on disk: MNIST, FashionMNIST, CIFAR-10/100, SVHN, and ODIN-style image folders.

Every adapter returns a map-style dataset of ``(image [C, H, W] float32 in [-1, 1], label int)`` pairs. Nothing is
downloaded unless ``download=True`` is passed (it goes straight to torchvision).
"""
import os

VISION = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# name -> (torchvision class name, where torchvision looks for the files under root)
_SPECS = {
    "mnist": ("MNIST", "MNIST/raw/ (train-images-idx3-ubyte, ... from http://yann.lecun.com/exdb/mnist)"),
    "fashionmnist": ("FashionMNIST", "FashionMNIST/raw/ (train-images-idx3-ubyte, ...)"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ (the unpacked cifar-10-python.tar.gz)"),
    "cifar100": ("CIFAR100", "cifar-100-python/ (the unpacked cifar-100-python.tar.gz)"),
    "svhn": ("SVHN", "train_32x32.mat / test_32x32.mat (from http://ufldl.stanford.edu/housenumbers)"),
}


def _torchvision():
    try:
        import torchvision
    except ImportError:
        raise ImportError("the torchvision adapters need torchvision: pip install 'fastood[vision]'") from None
    return torchvision


def _check_channels(channels):
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (keep the dataset's own), got {channels!r}")


def _check_size(size, allow_none=True):
    if size is None and allow_none:
        return
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int{' or None' if allow_none else ''}, got {size!r}")


class _ConvertMode:
    """PIL image -> PIL image in ``mode`` ("L" or "RGB"); a class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img.convert(self.mode)


class _ToUnitRange:
    """Tensor in [0, 1] -> [-1, 1]."""

    def __call__(self, x):
        return x * 2 - 1


def to_unit_range_transform(size=None, crop: bool = False, channels=None):
    """A torchvision transform: PIL image -> optional resize (``crop=False``) or center crop (``crop=True``) to
    ``size x size`` -> 1 or 3 channels -> float tensor [C, H, W] in [-1, 1] (``(x / 255 - 0.5) / 0.5``)."""
    T = _torchvision().transforms
    _check_size(size)
    _check_channels(channels)
    steps = []
    if channels is not None:
        steps.append(_ConvertMode("L" if channels == 1 else "RGB"))
    if size is not None:
        steps.append(T.CenterCrop(size) if crop else T.Resize((size, size)))
    steps += [T.ToTensor(), _ToUnitRange()]
    return T.Compose(steps)


def torchvision_dataset(name: str, root: str, train: bool = True, download: bool = False, size=None,
                        channels=None):
    """A torchvision dataset with images mapped to [-1, 1], yielding ``(x [C, H, W], label)``.

    Args:
        name: ``"mnist"``, ``"fashionmnist"``, ``"cifar10"``, ``"cifar100"`` or ``"svhn"`` (case, ``-`` and ``_``
            ignored).
        root: the folder holding the files in torchvision's layout.
        train: training split (SVHN: ``split="train"``) or test split.
        download: passed to torchvision (False by default: fastood never reaches the network on its own).
        size: resize to ``size x size`` (bilinear), e.g. 32 to score MNIST on a CIFAR model; None keeps 28/32.
        channels: 1 or 3 to convert (grayscale <-> RGB replicated), None keeps the dataset's own.

    Raises FileNotFoundError naming the folder it looked in and the files it expected when the data is missing
    and ``download=False``; RuntimeError with the same hint when a download fails.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _SPECS:
        raise ValueError(f"unknown torchvision dataset {name!r}; valid names: {', '.join(VISION)}")
    _torchvision()
    import torchvision.datasets as tv_datasets

    class_name, layout = _SPECS[key]
    cls = getattr(tv_datasets, class_name)
    transform = to_unit_range_transform(size=size, channels=channels)
    where = os.path.abspath(os.path.expanduser(str(root)))
    hint = (f"{class_name} expects {os.path.join(where, layout)}; pass download=True to fetch it there, or copy "
            "the files into that layout")
    try:
        if key == "svhn":
            return cls(where, split="train" if train else "test", transform=transform, download=download)
        return cls(where, train=train, transform=transform, download=download)
    except RuntimeError as exc:
        if not download and "not found" in str(exc).lower():
            raise FileNotFoundError(f"{class_name} not found in {where!r}: {hint}") from exc
        if download:
            raise RuntimeError(f"could not download {class_name} into {where!r} ({exc}); {hint}") from exc
        raise
    except OSError as exc:  # e.g. no network while downloading, or an unreadable folder
        raise RuntimeError(f"could not open {class_name} in {where!r} ({exc}); {hint}") from exc


class BadImageError(ValueError):
    """An image file that cannot be read (corrupt, truncated, not an image); the message names the file and how to
    skip such files instead (``skip_bad=True``; ``fastood eval --skip-bad-images``)."""


class ImageFiles:
    """Every image file under ``root`` (recursively, sorted by path) as ``(x [C, size, size] in [-1, 1], -1)``.

    An OOD set has no labels, so the label is always -1 and the folder layout does not matter (flat, one
    sub-folder, or many). Attributes: ``root``, ``files`` (absolute paths), ``bad`` (``[(path, error)]`` of the
    unreadable files met so far when ``skip_bad``).

    A file that cannot be read raises :class:`BadImageError` naming it; with ``skip_bad=True`` the item is None
    instead and the file is recorded in ``bad`` (a collate function must then drop the Nones, as
    :func:`fastood.folder_eval.folder_loaders` does; ``bad`` is filled in the process that reads, so keep
    ``num_workers=0`` to see it).
    """

    def __init__(self, root: str, transform, skip_bad: bool = False):
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.transform = transform
        self.skip_bad = bool(skip_bad)
        self.bad = []
        self.files = sorted(os.path.join(d, f) for d, _, names in os.walk(self.root) for f in names
                            if f.lower().endswith(IMAGE_EXTENSIONS))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from PIL import Image

        path = self.files[index]
        try:
            with Image.open(path) as img:
                return self.transform(img), -1
        except (OSError, SyntaxError, ValueError) as err:  # PIL: unidentified, truncated or broken files
            message = f"{type(err).__name__}: {' '.join(str(err).split())}"
            if not self.skip_bad:
                raise BadImageError(f"cannot read the image {path} ({message}); pass skip_bad=True (fastood eval: "
                                    "--skip-bad-images) to skip unreadable files and count them in the report"
                                    ) from None
            self.bad.append((path, message))
            return None

    def __repr__(self):
        return f"ImageFiles({self.root!r}, n={len(self)})"


def image_folder(root: str, size: int = 32, variant: str = "resize", channels: int = 3) -> ImageFiles:
    """An OOD image folder, e.g. TinyImageNet or LSUN, as in the ODIN protocol (Liang et al. 2018).

    ``variant="resize"`` gives the (r) sets (each image downsampled to ``size x size``), ``"crop"`` the (c) sets
    (a ``size x size`` patch; here the central one, so the set is the same on every run). Labels are -1.
    ``channels``: 3 (RGB) or 1 (grayscale). Raises FileNotFoundError when ``root`` is missing or holds no image.
    """
    if variant not in ("resize", "crop"):
        raise ValueError(f"variant must be 'resize' or 'crop', got {variant!r}")
    _check_size(size, allow_none=False)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    where = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(where):
        raise FileNotFoundError(f"image folder {where!r} does not exist: download the OOD set (e.g. the ODIN "
                                "TinyImageNet/LSUN resize or crop archives) and unpack it there; any layout works")
    dataset = ImageFiles(where, to_unit_range_transform(size=size, crop=variant == "crop", channels=channels))
    if not dataset.files:
        raise FileNotFoundError(f"image folder {where!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)}); "
                                "unpack the OOD set's images there")
    return dataset


class _Normalize:
    """Tensor in [0, 1] -> ``(x - mean) / std`` per channel (picklable for DataLoader workers)."""

    def __init__(self, mean, std):
        import torch

        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, x):
        return (x - self.mean) / self.std


def images_in(root: str, size=None, channels: int = 3, mean=None, std=None, skip_bad: bool = False) -> ImageFiles:
    """Every image file under ``root`` (any layout) as ``(x [channels, H, W], -1)``, for scoring a user's model.

    ``size``: resize to ``size x size`` (None keeps each file's size: they must then agree to be batched).
    ``mean``/``std`` (numbers or one per channel): normalize as ``(x - mean) / std`` from pixels in [0, 1], as the
    model was trained; without them images are mapped to fastood's [-1, 1]. ``skip_bad``: an unreadable file gives
    None (recorded in the dataset's ``bad``) instead of raising :class:`BadImageError`. Raises FileNotFoundError for
    a missing folder or one without images."""
    _check_size(size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the model's input normalization), or neither")
    where = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(where):
        raise FileNotFoundError(f"image folder {where!r} does not exist")
    T = _torchvision().transforms
    steps = [_ConvertMode("L" if channels == 1 else "RGB")]
    if size is not None:
        steps.append(T.Resize((size, size)))
    steps.append(T.ToTensor())
    if mean is None:
        steps.append(_ToUnitRange())
    else:
        from .normalization import bounds_for

        lower, _ = bounds_for(mean, std)  # validates them (positive std, matching lengths)
        if len(lower) not in (1, channels):
            raise ValueError(f"mean/std have {len(lower)} values but the images have {channels} channel(s)")
        steps.append(_Normalize(mean, std))
    dataset = ImageFiles(where, T.Compose(steps), skip_bad=skip_bad)
    if not dataset.files:
        raise FileNotFoundError(f"image folder {where!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
    return dataset
