"""Synthetic OOD sets at the ID image shape: Gaussian noise, uniform noise, points on a sphere, smooth blobs."""
import math

import torch
import torch.nn.functional as F

from .datasets import ImageDataset

NOISE_KINDS = ("gaussian", "uniform", "sphere", "blobs")


def noise(kind: str, n: int, shape, seed: int = 0, bounds=(-1.0, 1.0), radius=None, std: float = 0.5) -> ImageDataset:
    """``n`` synthetic images of ``shape`` (C, H, W), labels -1.

    - ``"gaussian"``: N(mid, std^2) per pixel (mid = centre of ``bounds``), clipped to ``bounds``.
    - ``"uniform"``: U(bounds) per pixel.
    - ``"sphere"``: uniform on the sphere of ``radius`` (flattened L2 norm) around the origin, as in
      Vernekar et al.; pass the largest norm of the ID data. Not clipped (it is meant to lie off the data).
    - ``"blobs"``: low-resolution Gaussian noise upsampled bilinearly (smooth structures), clipped to ``bounds``.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        raise ValueError(f"bounds must satisfy lower < upper, got {bounds}")
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        x = ((lo + hi) / 2 + std * torch.randn((n,) + shape, generator=g)).clamp(lo, hi)
    elif kind == "uniform":
        x = lo + (hi - lo) * torch.rand((n,) + shape, generator=g)
    elif kind == "sphere":
        if radius is None:
            raise ValueError("sphere noise needs radius= (the largest L2 norm of the ID images)")
        v = torch.randn(n, math.prod(shape), generator=g)
        x = (float(radius) * v / v.norm(dim=1, keepdim=True)).reshape((n,) + shape)
    else:
        c, h, w = shape
        low = torch.randn(n, c, max(2, h // 4), max(2, w // 4), generator=g)
        x = ((lo + hi) / 2 + (hi - lo) * 0.6 * F.interpolate(low, size=(h, w), mode="bilinear",
                                                              align_corners=False)).clamp(lo, hi)
    return ImageDataset(x, torch.full((n,), -1, dtype=torch.long), name=kind)
