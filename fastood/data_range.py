"""Does the data fill the box the samplers generate images in? :func:`check_data_range` and its warning class.

The samplers (Langevin, Gaussian noise, manifold) and FIG/GS generate images in a box ``bounds=(lower, upper)``
(default ``(-1, 1)``, the range of fastood's built-in data). Two ways a box can be wrong for the data:

- the data lie *outside* it (mean/std-normalized data in [-2, 2.1] under a [-1, 1] box): the samples never reach
  where the data are;
- the data fill *half of it or less* (pixels in [0, 1] under the default [-1, 1] box): about half of every
  generated image lies where the data never go, and the method spends its outliers there.

Either way the method trains, but not on the outliers its paper means; :func:`check_data_range` warns
(:class:`DataRangeWarning`, naming :func:`fastood.data.bounds_for`). The trainers with a sampler run it on their
first ID batch; the objectives (:mod:`fastood.objectives`) on their first call.
"""
import math
import numbers
import warnings

import torch

from fastood._stack import user_stacklevel

#: data beyond the box by more than this fraction of its width on a channel count as outside it
OUTSIDE_SLACK = 0.1
#: data spanning at most this fraction of the box's width on a channel count as not filling it (at most, not less
#: than: pixels in [0, 1] under the default [-1, 1] box fill exactly half of it)
MIN_FILL = 0.5


class DataRangeWarning(UserWarning):
    """The ID data and the box a sampler generates images in disagree (:func:`check_data_range`)."""


def _bounds_values(name, value):
    if isinstance(value, torch.Tensor):
        value = value.detach().flatten().tolist()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"bounds' {name} must be a finite number or one per channel, got {value!r}")
    return torch.tensor([float(v) for v in value], dtype=torch.float64)


def _as_box(bounds):
    """``(lower, upper)`` float64 tensors from a pair of numbers / per-channel sequences, or a sampler's
    ``lower`` / ``upper``."""
    if hasattr(bounds, "lower") and hasattr(bounds, "upper") and not isinstance(bounds, (tuple, list)):
        bounds = (bounds.lower, bounds.upper)
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__") or len(bounds) != 2:
        raise ValueError(f"bounds must be a pair (lower, upper) of numbers or per-channel sequences (as "
                         f"fastood.data.bounds_for returns), got {bounds!r}")
    lower, upper = _bounds_values("lower", bounds[0]), _bounds_values("upper", bounds[1])
    if lower.numel() != upper.numel() and 1 not in (lower.numel(), upper.numel()):
        raise ValueError(f"bounds' lower and upper have {lower.numel()} and {upper.numel()} values; give one per "
                         "channel for both (or one number)")
    if not bool((lower < upper).all()):
        raise ValueError(f"bounds must satisfy lower < upper on every channel, got {bounds!r}")
    return lower, upper


def _fmt(t):
    return "[" + ", ".join(f"{v:.3g}" for v in t.tolist()) + "]"


def range_problems(x: torch.Tensor, bounds, strict: bool = True):
    """The messages :func:`check_data_range` would warn with (an empty list when the data fit the box), or None
    when ``strict=False`` and the channel counts of ``x`` and ``bounds`` disagree."""
    if not isinstance(x, torch.Tensor) or not (x.is_floating_point() or x.dtype == torch.uint8):
        got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point image batch [B, C, ...], got {got}")
    if x.dim() < 2:
        raise ValueError(f"x must be an image batch [B, C, ...] with channels on dim 1, got shape {tuple(x.shape)}")
    lower, upper = _as_box(bounds)
    channels = x.shape[1]
    if lower.numel() not in (1, channels) or upper.numel() not in (1, channels):
        if not strict:
            return None
        raise ValueError(f"bounds have {max(lower.numel(), upper.numel())} values per side but x has {channels} "
                         f"channels (shape {tuple(x.shape)}): give one bound per channel, or one number")
    if x.numel() == 0:
        return []
    flat = x.detach().double().transpose(0, 1).reshape(channels, -1)
    finite = torch.isfinite(flat)  # non-finite pixels are the trainers' own error to raise: judge the others
    lo = torch.where(finite, flat, flat.new_tensor(math.inf)).amin(1).cpu()
    hi = torch.where(finite, flat, flat.new_tensor(-math.inf)).amax(1).cpu()
    lower, upper = lower.expand(channels), upper.expand(channels)
    width = upper - lower
    problems = []
    slack = OUTSIDE_SLACK * width
    outside = (lo < lower - slack) | (hi > upper + slack)
    if bool(outside.any()):
        problems.append(
            f"the ID data span {_fmt(lo)} .. {_fmt(hi)} per channel, but the images are generated in lower="
            f"{_fmt(lower)}, upper={_fmt(upper)}: samples drawn outside the data's range teach the model nothing "
            "about the data. If your images are normalized with mean/std, pass bounds=fastood.data.bounds_for(mean, "
            "std) to the trainer (or to your sampler)")
    thin = (hi - lo) <= (MIN_FILL + 1e-6) * width
    thin &= torch.isfinite(hi - lo)
    if bool(thin.any()):
        channel_list = ", ".join(str(c) for c in thin.nonzero().flatten().tolist())
        problems.append(
            f"the ID data span {_fmt(lo)} .. {_fmt(hi)} per channel, at most half of the box lower={_fmt(lower)}, "
            f"upper={_fmt(upper)} on channel(s) {channel_list}: much of every generated image lies where the data "
            "never go. Give the box your data live in: bounds=(0.0, 1.0) for pixels in [0, 1], bounds="
            "fastood.data.bounds_for(mean, std) for data normalized with mean/std (pass it to the trainer or to your "
            "sampler)")
    return problems


def check_data_range(x: torch.Tensor, bounds, *, who: str = None) -> bool:
    """Warn (:class:`DataRangeWarning`) when the images ``x`` do not fit the box ``bounds`` that outliers are
    generated in: when they lie outside it by more than 10% of its width on a channel, or span at most half of
    its width on a channel. The warning names :func:`fastood.data.bounds_for` and points at the caller's line.

    Args:
        x: an ID image batch [B, C, ...] (channels on dim 1), as the model sees it (after normalization).
        bounds: ``(lower, upper)``, each a number or one value per channel (what :func:`fastood.data.bounds_for`
            returns and every sampler's ``bounds=`` takes), or a sampler (its ``lower`` / ``upper``).
        who: a name to begin the message with (e.g. the trainer's class).
    Returns:
        True when the data fit the box, False when it warned.
    Raises:
        ValueError / TypeError for a malformed batch or bounds, or channel counts that disagree.

    A single batch is judged: give it a typical one (e.g. the first of your loader). Example::

        >>> x = torch.rand(8, 1, 28, 28)                     # pixels in [0, 1]
        >>> check_data_range(x, (-1.0, 1.0))                 # warns: the data fill half of the box
        False
        >>> check_data_range(x, (0.0, 1.0))
        True
    """
    problems = range_problems(x, bounds)
    if not problems:
        return True
    prefix = f"{who}: " if who else ""
    warnings.warn(prefix + "; and ".join(problems), DataRangeWarning, stacklevel=user_stacklevel())
    return False


__all__ = ["DataRangeWarning", "check_data_range", "range_problems"]
