"""Helpers for running fastood trainers under ``torchrun`` (PyTorch DistributedDataParallel).

The :class:`~fastood.trainers.base.Trainer` already wraps its model in DDP once a process group is
initialized, writes checkpoints from rank 0 and all-reduces the scalars it logs. What a training
script still has to do is start the process group, give every rank its share of each global batch,
seed each rank's samplers differently, and combine metrics. This module does those four things::

    from fastood import distributed as D

    info = D.init_from_env()                       # no-op (rank 0 of 1) outside torchrun
    loader = D.distributed_loader(train_set, batch_size=128, seed=0)
    D.seed_everything(0)                           # same seed everywhere: identical model init
    model = SmallCNN(...).to(info.device)
    D.seed_everything(0, per_rank=True)            # different outlier samples on every rank
    FIGTrainer(model, device=info.device, checkpoint_dir="run").fit(loader, epochs=1)
    D.cleanup()

Launch with ``torchrun --nproc_per_node=N script.py``. ``batch_size`` is per rank, so a global batch
holds ``N * batch_size`` examples; DDP averages gradients over ranks, which equals the gradient of the
mean loss over the global batch when every rank's batch has the same size.

BatchNorm caveat: a BatchNorm layer in training mode normalizes each rank's shard with that shard's statistics,
and DDP copies rank 0's running statistics to every rank before each forward, so with BatchNorm training an
N-rank run is *not* one process on the global batch (parameters 2e-2 apart after a few steps). Pass
``sync_bn=True`` to the trainer (CLI ``--sync-bn``) for global-batch statistics (:mod:`fastood.sync_batchnorm`),
or keep BatchNorm frozen (``freeze_bn=True``). A rank that dies or hangs makes the others fail after
``init_from_env(timeout_s=...)`` seconds (CLI ``--ddp-timeout``).
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from fastood.trainers.base import is_distributed, rank, world_size

__all__ = [
    "DistInfo", "init_from_env", "cleanup", "is_distributed", "rank", "world_size", "local_rank",
    "is_main_process", "barrier", "launched_by_torchrun", "rank_seed", "seed_everything",
    "distributed_loader", "all_reduce_mean", "all_reduce_metrics", "all_gather_tensor",
]

# Distinct large odd multiplier: per-rank seeds never collide with the next base seed.
_RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, and the
    ``device`` it should train on (``cuda:local_rank`` with CUDA, else the CPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``) are present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in every non-distributed run): the process that prints, plots and writes reports."""
    return rank() == 0


def _default_device(device, local):
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def init_from_env(backend: str | None = None, device=None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialize the default process group from ``torchrun``'s environment variables.

    Outside ``torchrun`` (no ``RANK``/``WORLD_SIZE``), or with ``WORLD_SIZE=1``, nothing is initialized and
    the result is rank 0 of 1. Calling it again once initialized returns the current state.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default ``nccl`` when the device is CUDA, else ``gloo``.
        device: the device to train on; default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        timeout_s: how long a collective waits for the other ranks before it fails (torch's default, 30 minutes,
            leaves the surviving ranks blocked that long when one rank dies or hangs; the CLI's ``--ddp-timeout``).
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    if backend is not None and backend not in ("nccl", "gloo", "mpi"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or 'mpi', got {backend!r}")
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = _default_device(device, local)
    if is_distributed():
        return DistInfo(rank(), world_size(), local, dev)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo(0, 1, 0, dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, got device={dev}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def cleanup() -> None:
    """Destroy the default process group if one is initialized (call once at the end of a script)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """The seed of one rank: ``seed`` on rank 0, ``seed + rank * 1_000_003`` elsewhere (fits in 63 bits)."""
    r = rank() if rank_ is None else int(rank_)
    return (int(seed) + r * _RANK_SEED_STRIDE) % (2 ** 63 - 1)


def seed_everything(seed: int, per_rank: bool = False) -> int:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators. Returns the seed used.

    ``per_rank=False`` seeds every rank alike (use it before building models so their initializations agree);
    ``per_rank=True`` seeds each rank with :func:`rank_seed` so the samplers that read torch's default
    generator (Langevin noise and initial points, Gaussian noise, CVAE latents) draw different outliers on
    every rank.
    """
    s = rank_seed(seed) if per_rank else int(seed)
    random.seed(s)
    np.random.seed(s % (2 ** 32))
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def distributed_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                       drop_last: bool = False, num_workers: int = 0, **loader_kwargs) -> DataLoader:
    """A DataLoader that gives each rank its share of every global batch.

    Always uses a :class:`DistributedSampler` (with one replica outside a process group), so the order of the
    data depends only on ``seed`` and the epoch: the Trainer calls ``set_epoch`` every epoch, and a run with
    ``N`` ranks of ``batch_size`` sees the same global batches as one process with ``N * batch_size``.

    Args:
        dataset: a map-style dataset.
        batch_size: examples per rank per step.
        shuffle: shuffle each epoch (seeded by ``seed + epoch``).
        seed: the data-order seed; the same on every rank.
        drop_last: drop the tail that does not fill a batch (and the sampler's padding).
        loader_kwargs: passed to :class:`DataLoader` (``pin_memory``, ``collate_fn``, ...).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(f"dataset must be map-style (define __len__), got {type(dataset).__name__}") from None
    if n == 0:
        raise ValueError("dataset is empty")
    for key in ("sampler", "batch_sampler"):
        if key in loader_kwargs:
            raise ValueError(f"distributed_loader sets the sampler itself; got {key}=. Pass shuffle= and seed= instead")
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle,
                                 seed=int(seed), drop_last=drop_last)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, **loader_kwargs)


def _reduce_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value, weight: float = 1.0):
    """The mean of ``value`` (a float or a tensor) over ranks, weighted by ``weight`` (e.g. the rank's number of
    examples). Returns the same kind it was given; outside a process group, the value itself."""
    if not is_distributed():
        return value
    is_tensor = isinstance(value, torch.Tensor)
    t = (value.detach().to(torch.float64) if is_tensor else torch.tensor(float(value), dtype=torch.float64))
    original = value.device if is_tensor else None
    t = t.to(_reduce_device())
    packed = torch.cat([(t * weight).reshape(-1), torch.tensor([float(weight)], dtype=torch.float64, device=t.device)])
    dist.all_reduce(packed)
    mean = (packed[:-1] / packed[-1]).reshape(t.shape)
    if is_tensor:
        return mean.to(device=original, dtype=value.dtype)
    return float(mean)


def all_reduce_metrics(metrics: dict, weight: float = 1.0) -> dict:
    """Average a dict of scalars (floats or 0-d tensors) over ranks in one collective, weighted by ``weight``.

    Every rank must pass the same keys. Returns floats."""
    values = {}
    for key, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
            v = v.item()
        try:
            values[key] = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"metric {key!r} must be a number, got {type(v).__name__}") from None
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys] + [float(weight)], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank (sizes may differ on dim 0), in rank order.

    Used to score a test set split across ranks and evaluate it once. Outside a process group, the tensor itself.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not is_distributed():
        return tensor
    device = _reduce_device()
    local = tensor.detach().to(device)
    size = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = torch.zeros((longest,) + tuple(local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)]).to(tensor.device)
