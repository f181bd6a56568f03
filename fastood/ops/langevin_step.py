"""Sign-gradient Langevin update of FIG (DESIGN.md, method 1, LDS step), in place."""
import functools
import math

import torch

from . import reference
from ._backend import use_native
from ._checks import check_nonnegative, check_same_device, check_tensor, float_values


@functools.lru_cache(maxsize=64)
def _cached_bound_tensor(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)


def _bound_tensor(values: tuple, device: torch.device) -> torch.Tensor:
    """Bounds as a float64 [1] or [C] tensor on ``device`` (cached: a sampler calls this every step)."""
    if torch.compiler.is_compiling():  # traced graphs build it themselves (dynamo does not honour lru_cache)
        return torch.tensor(values, dtype=torch.float64, device=device)
    return _cached_bound_tensor(values, device)


def _bound_values(name, value, channels):
    """Bounds as a tuple of floats of length 1 or ``channels``."""
    values = float_values(name, value)
    if len(values) not in (1, channels):
        raise ValueError(f"{name} must be a scalar or have one value per channel ({channels}), got {len(values)} values")
    if any(v != v for v in values):
        raise ValueError(f"{name} must not contain NaN, got {values}")
    return values


def _check_finite_nonnegative(name, value):
    value = check_nonnegative(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_not_tracked(x):
    """Refuse to overwrite a tensor autograd tracks, as ATen's in-place ops do (the step is not differentiable:
    sign(grad) is piecewise constant). The native op's autograd kernel (csrc/ops.cpp) checks the same; this check
    gives the reference backend the same rule and message."""
    if torch.is_grad_enabled() and x.requires_grad:
        if x.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation "
                               "(fastood::langevin_step_ on x); run the step under torch.no_grad() or on x.detach()")
        raise RuntimeError("fastood::langevin_step_ is not differentiable, but x requires grad (it is part of an "
                           "autograd graph); run the step under torch.no_grad() or on x.detach()")


def langevin_step_(x, grad, step_size, noise_std, lower, upper, active=None):
    """One Langevin step of FIG's sampler, in place (DESIGN.md, method 1, LDS):

    ``x <- clamp(x - step_size/2 * sign(grad) + noise_std * z, lower, upper)``, ``z ~ N(0, I)``.

    Args:
        x: [B, C, ...] float16/bfloat16/float32/float64 samples (2 to 8 dimensions), modified in place (any
            strides; computed in float32, or float64 for float64 x).
        grad: gradient of the energy w.r.t. x, same shape as x (any strides, any floating dtype: only its sign
            is used; ``sign(0) = sign(NaN) = 0`` as ``torch.sign``).
        step_size: eps_t >= 0 (each pixel moves by eps_t/2).
        noise_std: standard deviation >= 0 of the Gaussian noise (paper: sqrt(eps_t); authors' code: eps_t);
            0 draws no random numbers.
        lower, upper: scalar or per-channel [C] bounds (numbers, sequences or tensors) with lower <= upper,
            rounded to x's compute dtype (exact for float64 x).
        active: optional bool [B]; rows where it is False are left bit-identical.
    Returns:
        x, whose version counter is bumped (as by any in-place op).
    Raises:
        RuntimeError when grad mode is on and x requires grad (as ATen's in-place ops do for leaves; the step is
        not differentiable): run it under ``torch.no_grad()`` or on ``x.detach()``.

    NaN in x stays NaN (the clamp does not swallow it). Noise comes from torch's default generator of x's
    device, so ``torch.manual_seed`` reproduces a run; the native kernels draw it counter-based (CPU:
    Philox4x32-10 keyed once per call, independent of the thread count; CUDA: Philox from the CUDA generator's
    state, as dropout), so native and reference noise differ in value but not in distribution.
    """
    if isinstance(x, torch.Tensor) and not 2 <= x.dim() <= 8:
        raise ValueError(f"x must be [B, C, ...] with 2 to 8 dimensions, got shape {tuple(x.shape)}")
    check_tensor("x", x)
    check_tensor("grad", grad)
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    step_size = _check_finite_nonnegative("step_size", step_size)
    noise_std = _check_finite_nonnegative("noise_std", noise_std)
    channels = x.shape[1]
    lo = _bound_values("lower", lower, channels)
    hi = _bound_values("upper", upper, channels)
    n = max(len(lo), len(hi))
    lo_full, hi_full = lo * (n // len(lo)), hi * (n // len(hi))
    if any(lo_full[i] > hi_full[i] for i in range(n)):
        raise ValueError(f"lower must be <= upper, got lower={lo} upper={hi}")
    if active is not None:
        if not isinstance(active, torch.Tensor) or active.dtype != torch.bool:
            got = active.dtype if isinstance(active, torch.Tensor) else type(active).__name__
            raise TypeError(f"active must be a bool tensor of shape [{x.shape[0]}], got {got}")
        if active.shape != (x.shape[0],):
            raise ValueError(f"active must have shape [{x.shape[0]}] (one flag per row of x), got {tuple(active.shape)}")
    check_same_device(x=x, grad=grad, active=active)
    _check_not_tracked(x)
    if x.numel() == 0:
        return x
    if use_native(x):
        torch.ops.fastood.langevin_step_(x, grad, step_size, noise_std, _bound_tensor(lo_full, x.device),
                                         _bound_tensor(hi_full, x.device), active)
        return x
    # float64 bound tensors: a float32 tensor here would round float64 x's bounds (-0.1 -> -0.10000000149)
    return reference.langevin_step_(x, grad, step_size, noise_std,
                                    torch.tensor(lo_full, dtype=torch.float64) if n > 1 else lo_full[0],
                                    torch.tensor(hi_full, dtype=torch.float64) if n > 1 else hi_full[0], active)


try:
    @torch.library.register_fake("fastood::langevin_step_")
    def _fake_langevin(x, grad, step_size, noise_std, lower, upper, active):
        return None
except (RuntimeError, AttributeError, ValueError):  # extension not loaded: no schema to register against
    pass
