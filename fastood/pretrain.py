"""Pretrained baselines on built-in data, cached on disk so demos and benchmarks train them once."""
import os

import torch
from torch.utils.data import DataLoader

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastood")


def cache_dir(path=None) -> str:
    """The cache directory: ``path``, else ``$FASTOOD_CACHE``, else ``~/.cache/fastood``."""
    return path or os.environ.get("FASTOOD_CACHE") or DEFAULT_CACHE


def pretrained_small_cnn(benchmark_name: str = "mnist5k-0to4", epochs: int = 6, width: int = 32, seed: int = 0,
                         cache=None, progress: bool = True, batch_size: int = 64):
    """A :class:`~fastood.models.SmallCNN` trained with :class:`~fastood.trainers.StandardTrainer` on the ID
    training set of a built-in benchmark (SGD lr 0.1, momentum 0.9, wd 5e-4, steps at 50%/75%).

    The weights are cached as ``<cache>/smallcnn-<benchmark>-w<width>-e<epochs>-b<batch_size>-s<seed>.pt``; a second call loads
    them. Returns the model in eval mode on the CPU.
    """
    from fastood.data import benchmark
    from fastood.models import SmallCNN
    from fastood.trainers import StandardTrainer
    from fastood.weights_cache import load_cached_weights, save_cached_weights

    bench = benchmark(benchmark_name, seed=seed)
    c, h, _ = bench.shape
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=c, num_classes=bench.num_classes, image_size=h, width=width)
    path = os.path.join(cache_dir(cache), f"smallcnn-{benchmark_name}-w{width}-e{epochs}-b{batch_size}-s{seed}.pt")
    if load_cached_weights(model, path):
        return model.eval()
    loader = DataLoader(bench.id_train, batch_size=batch_size, shuffle=True, drop_last=True)
    StandardTrainer(model, progress=progress, seed=seed).fit(loader, epochs=epochs)
    save_cached_weights(model, path)  # checksummed, atomic; refuses NaN/inf weights
    return model.eval()
