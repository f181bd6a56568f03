"""Ready-made OOD benchmarks on built-in data, and auxiliary outliers for training that no test set contains.

Which auxiliary set may be trained on with which benchmark (``Benchmark.auxiliary`` enforces it):

=====================  ================  ================  =========================================================
auxiliary set          mnist5k-0to4      digits-0to4       why
=====================  ================  ================  =========================================================
``blobs``              disjoint          disjoint          generated smooth noise; no test set is made of blobs
``strokes``            disjoint          disjoint          generated pen strokes; no test set is made of strokes
``mnist5k-train-5to9`` disjoint          disjoint          *train* split of MNIST 5-9; mnist5k-0to4 tests on the
                                                           *test* split of the same seed; digits-0to4 has no MNIST
``digits-train-5to9``  NOT disjoint      disjoint          mnist5k-0to4's ``digits`` OOD test set holds *all* the
                                                           scikit-learn digits; digits-0to4 tests on the test split
=====================  ================  ================  =========================================================

The test noise sets (``gaussian``, ``uniform``, ``sphere``) are never offered for training: a model trained on
noise of the same kind would be judged on the distribution it was shown.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .builtin import load
from .real import load_real
from .datasets import ImageDataset, seeded_subset
from .synthetic import _check_shape, noise

#: CMG's Setting 1 (Wang et al. 2022, Table 1): ID = 6 consecutive MNIST classes, OOD = the other 4.
CMG_PARTITIONS = ("mnist-0to5", "mnist-1to6", "mnist-2to7", "mnist-3to8", "mnist-4to9")
#: Benchmarks on full MNIST / Fashion-MNIST (need ``fastood data fetch``; see :mod:`fastood.data.real`).
REAL_BENCHMARKS = ("mnist", "fashion-mnist", "mnist-0to4", "fashion-mnist-0to4") + CMG_PARTITIONS
BENCHMARKS = ("mnist5k-0to4", "digits-0to4") + REAL_BENCHMARKS
AUXILIARY = ("blobs", "strokes", "mnist5k-train-5to9", "digits-train-5to9")
_GENERATED = ("blobs", "strokes")
# Auxiliary sets that share images with a benchmark's OOD test sets (see the table above).
_NOT_DISJOINT = {"mnist5k-0to4": ("digits-train-5to9",), "digits-0to4": ()}
# On the full-data benchmarks the real auxiliary sets are MNIST / digits images: the ID data of the MNIST
# benchmarks and the OOD test distribution of the Fashion-MNIST ones. Only the generated sets are offered there.
_NOT_DISJOINT.update({name: ("mnist5k-train-5to9", "digits-train-5to9") for name in REAL_BENCHMARKS})


@dataclass
class Benchmark:
    """ID train/test sets and a dict of OOD test sets, all of shape ``shape`` (C, H, W) in [-1, 1].

    Attributes: ``name``, ``id_train`` and ``id_test`` (labels 0..num_classes-1), ``ood`` (name ->
    :class:`ImageDataset` with labels -1), ``num_classes``, ``seed`` (of the train/test split and the noise sets),
    ``shape``.
    """

    name: str
    id_train: ImageDataset
    id_test: ImageDataset
    ood: dict = field(default_factory=dict)
    num_classes: int = 0
    seed: int = 0

    @property
    def shape(self):
        """The image shape (C, H, W)."""
        return self.id_train.shape

    def auxiliary(self, name: str, n: int = 2000, seed: int = 100) -> ImageDataset:
        """Training outliers ``name`` at this benchmark's shape and split seed, disjoint from all of its OOD test
        sets; ValueError for a set that is not (e.g. ``digits-train-5to9`` with ``mnist5k-0to4``)."""
        if name in _NOT_DISJOINT.get(self.name, ()):
            safe = [a for a in AUXILIARY if a not in _NOT_DISJOINT[self.name]]
            raise ValueError(f"auxiliary set {name!r} shares images with an OOD test set (or is the ID data) of "
                             f"{self.name!r}; "
                             f"sets disjoint from its test sets: {', '.join(safe)}")
        return auxiliary_outliers(name, n=n, shape=self.shape, seed=seed, split_seed=self.seed)


def _as_ood(ds: ImageDataset, name: str) -> ImageDataset:
    return ImageDataset(ds.images, torch.full((len(ds),), -1, dtype=torch.long), name=name)


def _max_norm(ds: ImageDataset) -> float:
    """Vernekar et al.'s sphere radius: the largest L2 norm of a (flattened) image of ``ds``."""
    return float(ds.images.flatten(1).norm(dim=1).max())


def _real_benchmark(name: str, seed: int, root, ood_size, download) -> Benchmark:
    """The full-data benchmarks of Vernekar et al. (Table 1) and CMG (Table 1, Setting 1); see :func:`benchmark`."""
    if name in ("mnist", "fashion-mnist"):
        other = "fashion-mnist" if name == "mnist" else "mnist"
        id_classes, ood = list(range(10)), {}
        ood[other] = _as_ood(load_real(other, "test", root=root, download=download), other)
    else:
        source, span = name.rsplit("-", 1)
        first, last = (int(v) for v in span.split("to"))
        id_classes = list(range(first, last + 1))
        held = [c for c in range(10) if c not in id_classes]
        ood_name = f"{source}-{held[0]}to{held[-1]}" if held == list(range(held[0], held[-1] + 1)) else \
            f"{source}-{''.join(map(str, held))}"
        ood = {ood_name: _as_ood(load_real(source, "test", classes=held, root=root, download=download), ood_name)}
    source = name if name in ("mnist", "fashion-mnist") else name.rsplit("-", 1)[0]
    id_train = load_real(source, "train", classes=id_classes, root=root, download=download)
    id_test = load_real(source, "test", classes=id_classes, root=root, download=download)
    if id_classes[0] != 0:  # CMG partitions 1-6 .. 4-9: labels 0..5 for the classifier
        id_train = ImageDataset(id_train.images, id_train.labels - id_classes[0], name=id_train.name)
        id_test = ImageDataset(id_test.images, id_test.labels - id_classes[0], name=id_test.name)
    if name in ("mnist", "fashion-mnist"):  # the paper's synthetic sets, as many images as the ID test set
        n, shape = len(id_test), id_test.shape
        ood["gaussian"] = noise("gaussian", n, shape, seed=seed + 1)
        ood["uniform"] = noise("uniform", n, shape, seed=seed + 2)
        ood["sphere"] = noise("sphere", n, shape, seed=seed + 3, radius=_max_norm(id_train))
    if ood_size is not None:
        ood = {k: _subset(v, ood_size, seed) for k, v in ood.items()}
    return Benchmark(name, id_train, id_test, ood, num_classes=len(id_classes), seed=seed)


def _subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    """A seeded random subset of ``n`` images (all of them when ``n >= len(ds)``), in the set's order."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"ood_size must be a positive int or None, got {n!r}")
    return seeded_subset(ds, n, int(seed) + 7)


def benchmark(name: str, seed: int = 0, size=None, root=None, ood_size=None, download: bool = False) -> Benchmark:
    """An OOD benchmark: ID train/test sets and a dict of OOD test sets.

    Full-data benchmarks (official splits; need the files, see ``fastood data fetch`` and
    :func:`fastood.data.load_real`; ``root``/``download`` are passed there):

    - ``"mnist"``: ID = all 10 MNIST classes (60,000 / 10,000 images). OOD: ``fashion-mnist`` (its 10,000 test
      images), ``gaussian``, ``uniform`` and ``sphere`` (Vernekar et al.'s synthetic sets, as many images as the
      ID test set; sphere radius = the largest L2 norm of an ID training image).
    - ``"fashion-mnist"``: ID = Fashion-MNIST; OOD: ``mnist`` (test) and the same three synthetic sets.
    - ``"mnist-0to4"`` / ``"fashion-mnist-0to4"``: ID = classes 0-4; OOD = classes 5-9 of the test split
      (Vernekar et al., Table 1).
    - ``"mnist-0to5"``, ``"mnist-1to6"``, ``"mnist-2to7"``, ``"mnist-3to8"``, ``"mnist-4to9"``: CMG's Setting 1,
      ID = 6 consecutive classes (relabelled 0..5), OOD = the other 4 classes of the test split.

    ``ood_size`` keeps a seeded random subset of at most that many images per OOD set (faster evaluation).
    ``size`` is for the built-in benchmarks only.

    Built-in benchmarks (offline, small; 5 ID classes):

    - ``"mnist5k-0to4"``: ID = MNIST digits 0-4 (mnist5k, 28x28; 2,000 train / 500 test images).
      OOD test sets: ``mnist5k-5to9`` (the held-out digits 5-9 of the *test* split), ``digits`` (all of
      scikit-learn's digits resized to 28x28), ``gaussian``, ``uniform`` and ``sphere`` (radius = the largest
      L2 norm of the ID training images, as in Vernekar et al.).
    - ``"digits-0to4"``: ID = scikit-learn digits 0-4 at their native 8x8 (a tiny, fast benchmark; pass
      ``size=28`` to use the same networks as on MNIST). OOD: ``digits-5to9`` (test split) and the three noise sets.

    ``seed`` fixes the stratified train/test split (test fraction 0.2) and the noise sets; each noise set has as
    many images as the ID test set. ``size`` resizes every set to ``size x size`` (bilinear).
    """
    if name in REAL_BENCHMARKS:
        if size is not None:
            raise ValueError(f"size is for the built-in benchmarks; {name!r} is at the data's own 28x28")
        return _real_benchmark(name, seed, root, ood_size, download)
    if name == "mnist5k-0to4":
        source, ood_name = "mnist5k", "mnist5k-5to9"
    elif name == "digits-0to4":
        source, ood_name = "digits", "digits-5to9"
    else:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    id_train = load(source, "train", classes=range(5), size=size, seed=seed)
    id_test = load(source, "test", classes=range(5), size=size, seed=seed)
    side = id_train.shape[-1]
    ood = {ood_name: _as_ood(load(source, "test", classes=range(5, 10), size=size, seed=seed), ood_name)}
    if name == "mnist5k-0to4":
        ood["digits"] = _as_ood(load("digits", "all", size=side), "digits")
    n, shape = len(id_test), id_test.shape
    ood["gaussian"] = noise("gaussian", n, shape, seed=seed + 1)
    ood["uniform"] = noise("uniform", n, shape, seed=seed + 2)
    ood["sphere"] = noise("sphere", n, shape, seed=seed + 3, radius=_max_norm(id_train))
    return Benchmark(name, id_train, id_test, ood, num_classes=5, seed=seed)


def _to_shape(ds: ImageDataset, shape, name: str) -> ImageDataset:
    """Resize (bilinear) and repeat the single channel of a real auxiliary set to ``shape``."""
    c, h, w = shape
    x = ds.images
    if x.shape[0] and tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                          antialias=h < x.shape[-2]).clamp(-1, 1)
    if c != x.shape[1]:
        if x.shape[1] != 1:
            raise ValueError(f"cannot turn {x.shape[1]}-channel images of {name!r} into shape {tuple(shape)}")
        x = x.expand(-1, c, -1, -1).contiguous()
    return ImageDataset(x, torch.full((x.shape[0],), -1, dtype=torch.long), name=name)


def auxiliary_outliers(name: str, n: int = 2000, shape=(1, 28, 28), seed: int = 100,
                       split_seed: int = 0) -> ImageDataset:
    """Outliers for *training* (OE, Energy-OE, ICE, discrepancy, tuning detectors on a validation split), labels -1.

    Args:
        name: ``"blobs"`` or ``"strokes"`` (generated, see :func:`fastood.data.noise`), ``"mnist5k-train-5to9"``
            or ``"digits-train-5to9"`` (the *train* split of the held-out digits 5-9). See the module docstring for
            which benchmark's test sets each is disjoint from; :meth:`Benchmark.auxiliary` checks it for you.
        n: number of images; the real sets give at most their train split (a seeded random subset when fewer
            are asked for).
        shape: (C, H, W) of the images; real sets are resized and their channel repeated to match.
        seed: seed of the generated images and of the subset drawn from a real set.
        split_seed: seed of the train/test split of the real sets. It must equal the benchmark's ``seed``, or the
            train split taken here overlaps that benchmark's test split.
    """
    if name not in AUXILIARY:
        raise ValueError(f"unknown auxiliary outlier set {name!r}; valid names: {', '.join(AUXILIARY)}")
    if name in _GENERATED:
        return noise(name, n, shape, seed=seed)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    source = name.split("-", 1)[0]
    ds = load(source, "train", classes=range(5, 10), seed=split_seed)
    if n < len(ds):
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
        ds = ImageDataset(ds.images[keep], ds.labels[keep])
    return _to_shape(ds, _check_shape(shape), name)
