"""Offline data: built-in datasets, synthetic OOD sets, benchmarks, auxiliary outliers, torchvision adapters."""
from .benchmarks import AUXILIARY, BENCHMARKS, Benchmark, auxiliary_outliers, benchmark
from .builtin import BUILTIN, load
from .datasets import ImageDataset
from .synthetic import NOISE_KINDS, noise
from .vision import VISION, image_folder, torchvision_dataset

__all__ = ["load", "noise", "benchmark", "auxiliary_outliers", "torchvision_dataset", "image_folder", "ImageDataset",
           "Benchmark", "BUILTIN", "BENCHMARKS", "AUXILIARY", "NOISE_KINDS", "VISION"]
