"""Ready-made OOD benchmarks on built-in data, and auxiliary outliers for training that no test set contains."""
from dataclasses import dataclass, field

import torch

from .builtin import load
from .datasets import ImageDataset
from .synthetic import noise

BENCHMARKS = ("mnist5k-0to4", "digits-0to4")
AUXILIARY = ("blobs", "mnist5k-train-5to9")


@dataclass
class Benchmark:
    """ID train/test sets and a dict of OOD test sets, all of shape ``shape`` in [-1, 1]."""

    name: str
    id_train: ImageDataset
    id_test: ImageDataset
    ood: dict = field(default_factory=dict)
    num_classes: int = 0

    @property
    def shape(self):
        return self.id_train.shape


def _max_norm(ds: ImageDataset) -> float:
    return float(ds.images.flatten(1).norm(dim=1).max())


def _as_ood(ds: ImageDataset, name: str) -> ImageDataset:
    return ImageDataset(ds.images, torch.full((len(ds),), -1, dtype=torch.long), name=name)


def benchmark(name: str, seed: int = 0) -> Benchmark:
    """A built-in benchmark.

    - ``"mnist5k-0to4"``: ID = MNIST digits 0-4 (mnist5k, 28x28); OOD test sets: ``mnist5k-5to9`` (the held-out
      digits of the test split), ``digits`` (scikit-learn's digits resized to 28x28), ``gaussian``, ``uniform`` and
      ``sphere`` (radius = the largest norm of the ID training images).
    - ``"digits-0to4"``: ID = scikit-learn digits 0-4 (8x8); OOD: ``digits-5to9`` (test split) and the noise sets.
    The split is fixed by ``seed``; noise sets have as many images as the ID test set.
    """
    if name == "mnist5k-0to4":
        id_train = load("mnist5k", "train", classes=range(5), seed=seed)
        id_test = load("mnist5k", "test", classes=range(5), seed=seed)
        ood = {"mnist5k-5to9": _as_ood(load("mnist5k", "test", classes=range(5, 10), seed=seed), "mnist5k-5to9"),
               "digits": _as_ood(load("digits", "all", size=28), "digits")}
    elif name == "digits-0to4":
        id_train = load("digits", "train", classes=range(5), seed=seed)
        id_test = load("digits", "test", classes=range(5), seed=seed)
        ood = {"digits-5to9": _as_ood(load("digits", "test", classes=range(5, 10), seed=seed), "digits-5to9")}
    else:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    n, shape = len(id_test), id_test.shape
    ood["gaussian"] = noise("gaussian", n, shape, seed=seed + 1)
    ood["uniform"] = noise("uniform", n, shape, seed=seed + 2)
    ood["sphere"] = noise("sphere", n, shape, seed=seed + 3, radius=_max_norm(id_train))
    return Benchmark(name, id_train, id_test, ood, num_classes=5)


def auxiliary_outliers(name: str, n: int = 2000, shape=(1, 28, 28), seed: int = 100) -> ImageDataset:
    """Outliers for *training* (OE, Energy-OE, ICE, ...), disjoint from every test OOD set of the benchmarks.

    - ``"blobs"``: smooth random structures (low-resolution noise upsampled); no test set contains them.
    - ``"mnist5k-train-5to9"``: the *train* split of MNIST digits 5-9; ``mnist5k-0to4`` tests on the disjoint
      *test* split (same seed), so no test image is ever trained on. Ignores ``n`` and ``shape``.
    """
    if name == "blobs":
        return noise("blobs", n, shape, seed=seed)
    if name == "mnist5k-train-5to9":
        return _as_ood(load("mnist5k", "train", classes=range(5, 10), seed=0), name)
    raise ValueError(f"unknown auxiliary outlier set {name!r}; valid names: {', '.join(AUXILIARY)}")
