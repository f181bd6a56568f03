"""The box a model's inputs live in, for data normalized with ``(x - mean) / std``.

fastood's samplers (Langevin, Gaussian noise, manifold), FIG/GS and the manifold trainer generate images inside a
box ``bounds = (lower, upper)``; their default ``(-1, 1)`` is the range of fastood's built-in data. A project
that normalizes its images (``torchvision.transforms.Normalize(mean, std)``) gives the box of *its* inputs::

    bounds = fastood.data.bounds_for(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    FIGTrainer(model, bounds=bounds)          # or LangevinSampler(bounds=bounds), GaussianNoiseSampler(...)

and ODIN's input-perturbation step in pixel units with ``ODIN(model, std=std)``.
"""
import math

import torch


def _values(name, value):
    if isinstance(value, torch.Tensor):
        value = value.detach().reshape(-1).tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or one number per channel, got {value!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite numbers, got {value!r}")
    return values


def bounds_for(mean, std, pixel_range=(0.0, 1.0)):
    """Per-channel ``(lower, upper)`` of images normalized as ``(x - mean) / std`` from pixels in ``pixel_range``.

    Args:
        mean, std: as given to the normalization: numbers or one per channel (std > 0).
        pixel_range: ``(lo, hi)`` of the pixels before normalizing: (0, 1) after ``ToTensor()``, (0, 255) for raw
            bytes.
    Returns:
        ``(lower, upper)``, two tuples of floats with one value per channel (``lower[c] = (lo - mean[c]) / std[c]``,
        ``upper[c] = (hi - mean[c]) / std[c]``), accepted as ``bounds=`` by every sampler and trainer.

    >>> bounds_for(0.5, 0.5)
    ((-1.0,), (1.0,))
    """
    means, stds = _values("mean", mean), _values("std", std)
    if not all(s > 0 for s in stds):
        raise ValueError(f"std must be > 0, got {std!r}")
    if len(means) != len(stds) and 1 not in (len(means), len(stds)):
        raise ValueError(f"mean and std have {len(means)} and {len(stds)} values; give one per channel for both")
    if isinstance(pixel_range, (str, bytes)) or not hasattr(pixel_range, "__len__") or len(pixel_range) != 2:
        raise ValueError(f"pixel_range must be a pair (lo, hi), got {pixel_range!r}")
    lo, hi = _values("pixel_range", pixel_range)
    if not lo < hi:
        raise ValueError(f"pixel_range must satisfy lo < hi, got {pixel_range!r}")
    k = max(len(means), len(stds))
    means, stds = means * (k // len(means)), stds * (k // len(stds))
    return tuple((lo - m) / s for m, s in zip(means, stds)), tuple((hi - m) / s for m, s in zip(means, stds))


__all__ = ["bounds_for"]
