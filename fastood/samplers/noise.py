"""Noise samplers behind the sampler protocol: FIG's GS baseline (clamped Gaussian noise) and uniform noise.

Also the bound helpers every sampler of this package shares: a box ``[lower, upper]`` given as two scalars or
two per-channel sequences.
"""
import math
import operator

import torch
from torch import nn

from fastood.ops._checks import float_values
from fastood.batches import model_device
from fastood._hyperparameters import RecordsHyperparameters


# ---------------------------------------------------------------------------------------------------- bounds
def check_bounds(bounds, name="bounds"):
    """Validate a box ``(lower, upper)``; each a number or a per-channel sequence/tensor.

    Returns ``(lower, upper)`` as two tuples of floats (length 1 for a scalar, else one value per channel),
    with ``lower <= upper`` elementwise (a scalar broadcasts against a sequence) and no NaN/Inf.
    """
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) != 2:
        raise ValueError(f"{name} must be a pair (lower, upper), got {bounds!r}")
    out = []
    for side, value in zip(("lower", "upper"), bounds):
        values = float_values(f"{name}: {side}", value)
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name}: {side} must be finite and non-empty, got {values}")
        out.append(values)
    lo, hi = out
    if len(lo) != len(hi) and 1 not in (len(lo), len(hi)):
        raise ValueError(f"{name}: lower and upper have {len(lo)} and {len(hi)} values; give one per channel for both")
    k = max(len(lo), len(hi))
    if any(a > b for a, b in zip(lo * (k // len(lo)), hi * (k // len(hi)))):
        raise ValueError(f"{name} must satisfy lower <= upper, got lower={lo} upper={hi}")
    return lo, hi


def check_shape(shape, bounds=None):
    """Validate an image shape ``(C, ...)`` of positive ints (and per-channel bounds against C). Returns a tuple."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints such as (C, H, W), got {shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be non-empty with positive sizes, such as (C, H, W), got {shape}")
    if bounds is not None:
        for values in bounds:
            if len(values) not in (1, shape[0]):
                raise ValueError(f"per-channel bounds have {len(values)} values but the shape {shape} has "
                                 f"{shape[0]} channels")
    return shape


def check_count(n):
    """``n`` as an int >= 0 (TypeError for non-integers, ValueError for negatives)."""
    if isinstance(n, bool):
        raise TypeError("n must be an int (number of samples), got bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an int (number of samples), got {type(n).__name__}") from None
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


def bound_tensor(values, ndim, device, dtype=torch.float32):
    """Bound values (a tuple from :func:`check_bounds`) as a tensor that broadcasts against [B, C, ...] (``ndim``
    dims)."""
    t = torch.tensor(values, dtype=dtype, device=device)
    return t.reshape((1, -1) + (1,) * (ndim - 2)) if t.numel() > 1 else t.reshape(())


def uniform_in(lo, hi, size, device, dtype=torch.float32):
    """``U(lo, hi)`` per element of ``size`` = (n, C, ...), per-channel bounds allowed (torch's default generator)."""
    lo_t, hi_t = bound_tensor(lo, len(size), device, dtype), bound_tensor(hi, len(size), device, dtype)
    return lo_t + (hi_t - lo_t) * torch.rand(size, device=device, dtype=dtype)


def _sampling_device(model):
    if model is None:
        return torch.device("cpu")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    return model_device(model)


# ---------------------------------------------------------------------------------------------------- samplers
class _NoiseSampler(metaclass=RecordsHyperparameters):
    """Shared protocol: ``sample(model, n, shape, context=None) -> [n, *shape]`` on the model's device."""

    def __init__(self, bounds=(-1.0, 1.0)):
        self.lower, self.upper = check_bounds(bounds)
        self.stats = {}

    def _draw(self, size, device):
        raise NotImplementedError

    def sample(self, model, n, shape, context=None):
        """``n`` noise images of ``shape`` (C, H, W) -> [n, *shape] float32, on ``model``'s device (CPU if None).

        The model and ``context`` are ignored except for the device. Noise comes from torch's default generator
        of that device, so ``torch.manual_seed`` reproduces it.
        """
        n = check_count(n)
        shape = check_shape(shape, (self.lower, self.upper))
        x = self._draw((n,) + shape, _sampling_device(model))
        self.stats = {"n": n}
        return x

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class GaussianNoiseSampler(_NoiseSampler):
    """``clip(mean + std * N(0, I), lower, upper)`` per pixel: the images of FIG's GS baseline.

    Args:
        std: standard deviation (> 0) of the noise, in image units (images live in [-1, 1]).
        mean: its mean.
        bounds: ``(lower, upper)``, scalars or per-channel sequences.
    """

    def __init__(self, std: float = 0.5, mean: float = 0.0, bounds=(-1.0, 1.0)):
        super().__init__(bounds)
        std, mean = float(std), float(mean)
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"std must be a finite number > 0, got {std}")
        if not math.isfinite(mean):
            raise ValueError(f"mean must be finite, got {mean}")
        self.std, self.mean = std, mean

    def _draw(self, size, device):
        x = self.mean + self.std * torch.randn(size, device=device)
        lo, hi = bound_tensor(self.lower, len(size), device), bound_tensor(self.upper, len(size), device)
        return torch.minimum(torch.maximum(x, lo), hi)


class UniformNoiseSampler(_NoiseSampler):
    """``U(lower, upper)`` per pixel (per-channel bounds allowed)."""

    def _draw(self, size, device):
        return uniform_in(self.lower, self.upper, size, device)
