"""Argument checks shared by the ops' Python wrappers: errors name the argument, the expectation and the value."""
import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name, value, dims=None, dtypes=FLOATING):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in ((dims,) if isinstance(dims, int) else dims):
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {value.dtype}")


def check_same_device(**tensors):
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}")


def check_nonnegative(name, value):
    value = float(value)
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_positive(name, value):
    value = float(value)
    if not value > 0.0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def float_values(name, value) -> tuple:
    """A number, a sequence of numbers or a tensor as a tuple of floats (a per-channel bound, for instance).
    Raises TypeError (not a number or an iterable) or ValueError (items that are not numbers, such as the
    characters of a string), naming ``name``."""
    if isinstance(value, torch.Tensor):
        return tuple(float(v) for v in value.detach().cpu().reshape(-1).tolist())
    if isinstance(value, (int, float)):
        return (float(value),)
    expected = f"{name} must be a number, a sequence of numbers or a tensor, got {value!r}"
    try:
        return tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(expected) from None
    except ValueError:
        raise ValueError(expected) from None
