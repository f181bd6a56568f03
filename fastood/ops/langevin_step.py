"""Sign-gradient Langevin update of FIG (DESIGN.md, method 1, LDS step), in place."""
import functools

import torch

from . import reference
from ._backend import use_native
from ._checks import check_nonnegative, check_same_device, check_tensor


@functools.lru_cache(maxsize=64)
def _bound_tensor(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def _bound_values(name, value, channels):
    """Bounds as a tuple of floats of length 1 or ``channels``."""
    if isinstance(value, torch.Tensor):
        values = tuple(float(v) for v in value.detach().cpu().reshape(-1).tolist())
    elif isinstance(value, (int, float)):
        values = (float(value),)
    else:
        try:
            values = tuple(float(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be a number, a sequence or a tensor, got {type(value).__name__}") from None
    if len(values) not in (1, channels):
        raise ValueError(f"{name} must be a scalar or have one value per channel ({channels}), got {len(values)} values")
    if any(v != v for v in values):
        raise ValueError(f"{name} must not contain NaN, got {values}")
    return values


def langevin_step_(x, grad, step_size, noise_std, lower, upper, active=None):
    """One Langevin step, in place: ``x <- clamp(x - step/2 sign(grad) + noise_std N(0,1), lower, upper)``.

    Args:
        x: [B, C, ...] float samples (modified in place).
        grad: gradient of the energy w.r.t. x, same shape as x (any strides).
        step_size: eps_t >= 0 (the update moves each pixel by eps_t/2).
        noise_std: standard deviation >= 0 of the Gaussian noise (paper: sqrt(eps_t); authors' code: eps_t).
        lower, upper: scalar or per-channel [C] bounds with lower <= upper (held in float64).
        active: optional bool [B]; rows where it is False are left untouched.
    Noise comes from torch's default generator of x's device, so ``torch.manual_seed`` reproduces a run.
    Returns x.
    """
    check_tensor("x", x, dims=range(2, 9))
    check_tensor("grad", grad)
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    step_size = check_nonnegative("step_size", step_size)
    noise_std = check_nonnegative("noise_std", noise_std)
    channels = x.shape[1]
    lo = _bound_values("lower", lower, channels)
    hi = _bound_values("upper", upper, channels)
    if len(lo) != len(hi) and 1 not in (len(lo), len(hi)):
        raise ValueError(f"lower and upper must have matching lengths, got {len(lo)} and {len(hi)}")
    n = max(len(lo), len(hi))
    lo_full, hi_full = lo * (n // len(lo)), hi * (n // len(hi))
    bad = [i for i in range(n) if lo_full[i] > hi_full[i]]
    if bad:
        raise ValueError(f"lower must be <= upper, got lower={lo} upper={hi}")
    if active is not None:
        check_tensor("active", active, dims=1, dtypes=(torch.bool,))
        if active.shape[0] != x.shape[0]:
            raise ValueError(f"active must have shape [{x.shape[0]}] (one flag per row of x), got {tuple(active.shape)}")
    check_same_device(x=x, grad=grad, active=active)
    if x.shape[0] == 0 or x.numel() == 0:
        return x
    if use_native(x):
        torch.ops.fastood.langevin_step_(x, grad, step_size, noise_std, _bound_tensor(lo_full, x.device),
                                         _bound_tensor(hi_full, x.device), active)
        return x
    return reference.langevin_step_(x, grad, step_size, noise_std, torch.tensor(lo_full) if n > 1 else lo_full[0],
                                    torch.tensor(hi_full) if n > 1 else hi_full[0], active)


try:
    @torch.library.register_fake("fastood::langevin_step_")
    def _fake_langevin(x, grad, step_size, noise_std, lower, upper, active):
        return None
except (RuntimeError, AttributeError, ValueError):  # extension not loaded: no schema to register against
    pass
