"""Synthetic OOD images at the ID image shape: Gaussian and uniform noise, points on a sphere, smooth blobs, strokes.

Every set is generated from its own ``torch.Generator`` seeded with ``seed``, so the same arguments always give the
same images and the global RNG is left untouched.
"""
import math

import torch
import torch.nn.functional as F

from .datasets import ImageDataset

NOISE_KINDS = ("gaussian", "uniform", "sphere", "blobs", "strokes")
_CHUNK = 512  # images rendered at once by "strokes" (bounds its memory to about _CHUNK * segments * H * W floats)


def _check_shape(shape):
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape!r}") from None
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"shape must be (C, H, W) of positive ints, got {shape!r}")
    return shape


def _positive(name, value):
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def noise(kind: str, n: int, shape, seed: int = 0, bounds=(-1.0, 1.0), radius=None, std: float = 0.5) -> ImageDataset:
    """``n`` synthetic images of ``shape`` (C, H, W), float32, labels -1 (so loaders yield ``(x, y)`` tuples).

    Kinds:
        - ``"gaussian"``: ``N(mid, std^2)`` per pixel, ``mid`` the centre of ``bounds``, clipped to ``bounds``.
          With the default ``std = 0.5`` and bounds (-1, 1), 4.6% of the pixels are clipped: the images fill the
          box without piling up on its faces.
        - ``"uniform"``: ``U(bounds)`` per pixel.
        - ``"sphere"``: uniform on the sphere ``{x : ||x||_2 = radius}`` around the origin (norm of the flattened
          image), as in Vernekar et al. (2019), who sample it at ``radius = max_i ||x_i||`` over the ID data:
          pass that radius. Without ``radius`` it is ``sqrt(C*H*W) * max(|lower|, |upper|)``, the norm of the
          farthest corner of the box, the largest norm any image in ``bounds`` can have. Not clipped: these points
          are meant to lie away from the data, most of their pixels outside ``bounds``.
        - ``"blobs"``: Gaussian noise at a quarter of the resolution, upsampled bilinearly around ``mid`` and
          clipped to ``bounds``: smooth random structures, no digit, no texture.
        - ``"strokes"``: a random polyline of 3 straight pen strokes (Gaussian pen profile, sigma 1-2 px per
          28 px of image side) drawn towards ``upper`` on a ``lower`` background, each channel with its own ink
          intensity: digit-like scribbles that are no digit.

    Args:
        kind: one of ``NOISE_KINDS``.
        n: number of images (>= 0).
        shape: (C, H, W).
        seed: seed of this set's private generator.
        bounds: (lower, upper) pixel range.
        radius: sphere radius (``"sphere"`` only).
        std: Gaussian standard deviation (``"gaussian"`` only).
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    shape = _check_shape(shape)
    try:
        lo, hi = float(bounds[0]), float(bounds[1])
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"bounds must be (lower, upper), got {bounds!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lower < upper, got {bounds!r}")
    std = _positive("std", std)
    g = torch.Generator().manual_seed(int(seed))
    mid = (lo + hi) / 2
    if kind == "gaussian":
        x = (mid + std * torch.randn((n,) + shape, generator=g)).clamp_(lo, hi)
    elif kind == "uniform":
        x = lo + (hi - lo) * torch.rand((n,) + shape, generator=g)
    elif kind == "sphere":
        dim = math.prod(shape)
        radius = math.sqrt(dim) * max(abs(lo), abs(hi)) if radius is None else _positive("radius", radius)
        v = torch.randn(n, dim, generator=g, dtype=torch.float64)
        x = (radius * v / v.norm(dim=1, keepdim=True)).float().reshape((n,) + shape)
    elif kind == "blobs":
        c, h, w = shape
        low = torch.randn(n, c, max(2, h // 4), max(2, w // 4), generator=g)
        smooth = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) if n else \
            low.new_zeros(0, c, h, w)
        x = (mid + (hi - lo) * 0.6 * smooth).clamp_(lo, hi)
    else:
        x = torch.cat([_strokes(min(_CHUNK, n - i), shape, g, lo, hi) for i in range(0, n, _CHUNK)]) if n else \
            torch.zeros((0,) + shape)
    return ImageDataset(x, torch.full((n,), -1, dtype=torch.long), name=kind)


def _strokes(n: int, shape, g: torch.Generator, lo: float, hi: float, segments: int = 3) -> torch.Tensor:
    """[n, C, H, W]: ink = max over segments of ``exp(-d^2 / (2 width^2))``, d = pixel distance to the segment."""
    c, h, w = shape
    side = torch.tensor([h - 1.0, w - 1.0])
    # Vertices inside the central 80% of the image, like a digit drawn in its box.
    vertices = (0.1 + 0.8 * torch.rand(n, segments + 1, 2, generator=g)) * side        # [n, S+1, 2]
    width = (1.0 + 1.0 * torch.rand(n, 1, 1, generator=g)) * (min(h, w) / 28.0)       # [n, 1, 1]
    intensity = 0.7 + 0.3 * torch.rand(n, c, 1, generator=g)                            # [n, C, 1]
    start, end = vertices[:, :-1, None, :], vertices[:, 1:, None, :]                  # [n, S, 1, 2]
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    pixels = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)                 # [P, 2]
    direction = end - start
    t = ((pixels - start) * direction).sum(-1) / direction.pow(2).sum(-1).clamp_min(1e-12)
    nearest = start + t.clamp(0, 1).unsqueeze(-1) * direction                          # [n, S, P, 2]
    dist2 = (pixels - nearest).pow(2).sum(-1)                                         # [n, S, P]
    ink = torch.exp(-dist2 / (2 * width ** 2)).amax(dim=1)                            # [n, P]
    return (lo + (hi - lo) * intensity * ink.unsqueeze(1)).reshape(n, c, h, w)
