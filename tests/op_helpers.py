"""Shared pieces of the op tests: devices, dtype tolerances, error-reporting comparison, layouts."""
import pytest
import torch

import fastood.ops as ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
HALF_DTYPES = [torch.float16, torch.bfloat16]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}

needs_native = pytest.mark.skipif(not ops.native_available(), reason="native extension not built")


def assert_close(got, want, tol, what=""):
    """assert_close that prints max and mean error on failure; NaNs must be in the same places."""
    got64, want64 = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    nan_got, nan_want = torch.isnan(got64), torch.isnan(want64)
    assert torch.equal(nan_got, nan_want), f"{what}: NaN positions differ"
    finite = ~nan_want
    err = (got64[finite] - want64[finite]).abs()
    scale = want64[finite].abs().clamp_min(1.0)
    rel = err / scale
    if err.numel():
        assert rel.max() <= tol, (f"{what}: max error {err.max():.3e}, mean error {err.mean():.3e}, "
                                  f"max relative {rel.max():.3e} > tol {tol:.1e}")


def layouts(t):
    """The same values as contiguous, transposed-then-back (non-contiguous) and strided views."""
    yield "contiguous", t
    yield "transposed", t.t().contiguous().t() if t.dim() == 2 else t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    yield "strided", wide[..., ::2]


def native_ops():
    """Context: force the native backend (tests comparing it against the reference)."""
    return ops.use_backend("native")


def all_layouts(t):
    """layouts() plus a contiguous view whose data pointer is not 16-byte aligned (the unpacked CUDA path)."""
    yield from layouts(t)
    flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = flat[1:].view(t.shape)
    shifted.copy_(t)
    yield "misaligned", shifted


def sample_logits(shape, dtype, device, scale):
    """Gaussian logits of standard deviation ``scale``, drawn in float64 on the CPU (the same values for every
    dtype and device under one seed), then cast and moved."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def check_backward_matches_reference(op, reference_op, logits, tol):
    """Gradient of ``sum(w * op(logits))`` with the native backend vs ``reference_op`` under autograd, for random
    row weights w; the gradient keeps the logits' dtype."""
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.randn(logits.shape[0], device=logits.device, dtype=logits.dtype)
    with native_ops():
        (op(a) * w).sum().backward()
    (reference_op(b) * w).sum().backward()
    assert a.grad.dtype == logits.dtype
    assert_close(a.grad, b.grad, tol, "backward")
