"""fastood.ops.modified_energy / modified_energy_grad (FIG modified energy) against the pure-PyTorch reference."""
import math

import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
import op_helpers
from op_helpers import DEVICES, HALF_DTYPES, TOLERANCE, all_layouts, assert_close, native_ops, needs_native

ALL_DTYPES = [torch.float32, torch.float64] + HALF_DTYPES
# B = 0, C = 0, C = 1, C below / above one CPU vector (16 floats), C above one CUDA warp's row (1024).
SHAPES = [(0, 10), (4, 0), (1, 1), (7, 1), (33, 10), (128, 100), (5, 1000), (3, 2053), (2, 4096)]


def sample_logits(shape, dtype, device, scale=4.0):
    return op_helpers.sample_logits(shape, dtype, device, scale)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_energy_and_grad_match_reference(device, dtype, shape):
    logits = sample_logits(shape, dtype, device)
    for layout, x in all_layouts(logits):
        with native_ops():
            energy = ops.modified_energy(x, c=5.0)
            e2, grad = ops.modified_energy_grad(x, c=5.0)
            g = torch.randn(shape[0], dtype=torch.float64, device=device).to(dtype)
            back = torch.ops.fastood.modified_energy_backward(g, x, 5.0)
        want_e, want_g = reference.modified_energy_grad(x.double(), c=5.0)
        assert energy.dtype == dtype and grad.dtype == dtype and back.dtype == dtype
        assert energy.shape == (shape[0],) and grad.shape == shape and grad.is_contiguous()
        assert_close(energy, want_e, TOLERANCE[dtype], f"energy {layout}")
        assert_close(e2, want_e, TOLERANCE[dtype], f"energy (grad op) {layout}")
        assert_close(grad, want_g, TOLERANCE[dtype], f"grad {layout}")
        assert_close(back, want_g * g.double().unsqueeze(1), TOLERANCE[dtype], f"backward {layout}")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_row_length_up_to_three_vectors(dtype):
    """Full vector blocks plus a masked partial block: every remainder of the CPU's 16 (8 for float64) lanes."""
    for cols in range(1, 50):
        logits = sample_logits((3, cols), dtype, "cpu")
        with native_ops():
            energy, grad = ops.modified_energy_grad(logits, c=2.0)
        want_e, want_g = reference.modified_energy_grad(logits.double(), c=2.0)
        assert_close(energy, want_e, TOLERANCE[dtype], f"energy C={cols}")
        assert_close(grad, want_g, TOLERANCE[dtype], f"grad C={cols}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_grad_op_equals_autograd_of_reference(device, dtype, tol):
    logits = sample_logits((16, 7), dtype, device, scale=3.0).requires_grad_()
    (want,) = torch.autograd.grad(reference.modified_energy(logits, 3.0).sum(), logits)
    with native_ops():
        energy, grad = ops.modified_energy_grad(logits, 3.0)
    assert not energy.requires_grad and not grad.requires_grad  # no autograd: plain tensors
    assert_close(grad, want, tol, "dE/df")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed):
    torch.manual_seed(seed)
    logits = (torch.randn(6, 19, dtype=torch.float64, device=device) * 2).requires_grad_()
    c = [5.0, 2.0, 1.0][seed]
    with native_ops():
        assert torch.autograd.gradcheck(lambda f: ops.modified_energy(f, c), (logits,))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-1)])
def test_backward_matches_reference_autograd(device, dtype, tol):
    logits = sample_logits((32, 10), dtype, device, scale=3.0)
    op_helpers.check_backward_matches_reference(ops.modified_energy, reference.modified_energy, logits, tol)


@needs_native
def test_backward_takes_expanded_and_wider_incoming_gradients():
    logits = sample_logits((6, 9), torch.float32, "cpu")
    want = reference.modified_energy_grad(logits)[1] * 2.5
    with native_ops():
        expanded = torch.ops.fastood.modified_energy_backward(torch.tensor([2.5]).expand(6), logits, 5.0)
        wider = torch.ops.fastood.modified_energy_backward(torch.full((6,), 2.5, dtype=torch.float64), logits, 5.0)
    assert expanded.dtype == torch.float32 and wider.dtype == torch.float32
    assert_close(expanded, want, 2e-5, "expanded grad_energy")
    assert_close(wider, want, 2e-5, "float64 grad_energy")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_single_class_closed_form(backend):
    if backend == "native" and not ops.native_available():
        pytest.skip("native extension not built")
    f = torch.tensor([[2.0], [-1.0], [0.0]], dtype=torch.float64)
    s = f / 5.0
    with ops.use_backend(backend):
        energy, grad = ops.modified_energy_grad(f)
        assert_close(ops.modified_energy(f), (s * (1 - s.exp())).squeeze(1), 1e-12, "E for C=1")
    assert_close(energy, (s * (1 - s.exp())).squeeze(1), 1e-12, "E (grad op) for C=1")
    assert_close(grad, (1 - (1 + s) * s.exp()) / 5.0, 1e-12, "dE/df for C=1")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nan_and_inf_propagate_like_reference(device, dtype):
    """NaN, +-inf and overflowing exp(f/c): the same NaN/inf pattern and values as the reference."""
    logits = sample_logits((5, 20), dtype, device)
    logits[1, 2] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 19] = float("-inf")
    logits[4, 5] = 1e4 if dtype != torch.float64 else 1e6  # exp(f/c) overflows
    logits[4, 6] = -1e4
    with native_ops():
        energy, grad = ops.modified_energy_grad(logits)
        energy_only = ops.modified_energy(logits)
    want_e, want_g = reference.modified_energy_grad(logits)
    assert torch.isnan(energy[1]) and torch.isnan(grad[1, 2]) and torch.isfinite(grad[1, 3])
    assert energy[4] == float("-inf")
    torch.testing.assert_close(energy, want_e, equal_nan=True, rtol=TOLERANCE[dtype], atol=0)
    torch.testing.assert_close(energy_only, want_e, equal_nan=True, rtol=TOLERANCE[dtype], atol=0)
    torch.testing.assert_close(grad, want_g, equal_nan=True, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = torch.randn(8, 5, device=device, requires_grad=True)
    opcheck(torch.ops.fastood.modified_energy.default, (logits, 5.0))
    opcheck(torch.ops.fastood.modified_energy_grad.default, (logits.detach(), 5.0))
    opcheck(torch.ops.fastood.modified_energy_backward.default, (torch.randn(8, device=device), logits.detach(), 5.0))


@needs_native
def test_torch_compile_fullgraph():
    def f(logits):
        energy, grad = ops.modified_energy_grad(logits)
        return ops.modified_energy(logits).sum() + energy.sum() + grad.sum()

    logits = torch.randn(8, 5)
    with native_ops():
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(logits), f(logits))

        x = logits.clone().requires_grad_()
        (g1,) = torch.autograd.grad(torch.compile(lambda t: ops.modified_energy(t).sum(), fullgraph=True,
                                                  backend="aot_eager")(x), x)
    torch.testing.assert_close(g1, reference.modified_energy_grad(logits)[1])


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(3), ValueError, "logits must have 2 dimensions, got shape \\(3,\\)"),
    (torch.randn(2, 3, 4), ValueError, "logits must have 2 dimensions"),
    (torch.randint(0, 3, (3, 4)), TypeError, "logits must have a floating dtype .*got torch.int64"),
    ("not a tensor", TypeError, "logits must be a torch.Tensor, got str"),
])
def test_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        ops.modified_energy(bad)
    with pytest.raises(error, match=match):
        ops.modified_energy_grad(bad)


@pytest.mark.parametrize("c", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_c(c):
    with pytest.raises(ValueError, match="c must be a finite number > 0"):
        ops.modified_energy(torch.randn(2, 3), c=c)
    with pytest.raises(ValueError, match="c must be a finite number > 0"):
        ops.modified_energy_grad(torch.randn(2, 3), c=c)


@needs_native
def test_native_checks_name_the_argument():
    F = torch.ops.fastood
    with pytest.raises(RuntimeError, match=r"logits must be 2-D \[B, C\], got shape \[3\]"):
        F.modified_energy(torch.randn(3), 5.0)
    with pytest.raises(RuntimeError, match="logits must have dtype float16, bfloat16, float32 or float64, got Long"):
        F.modified_energy_grad(torch.zeros(2, 3, dtype=torch.int64), 5.0)
    with pytest.raises(RuntimeError, match=r"grad_energy must have shape \[4\], got \[3\]"):
        F.modified_energy_backward(torch.randn(3), torch.randn(4, 5), 5.0)
    with pytest.raises(RuntimeError, match="c must be a finite number > 0, got -1"):
        F.modified_energy(torch.randn(2, 3), -1.0)


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_native_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="grad_energy must be on the same device as logits"):
        torch.ops.fastood.modified_energy_backward(torch.randn(4), torch.randn(4, 5, device="cuda"), 5.0)


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_matches_cpu(dtype):
    logits = sample_logits((300, 777), dtype, "cpu")
    with native_ops():
        e_cpu, g_cpu = ops.modified_energy_grad(logits)
        e_gpu, g_gpu = ops.modified_energy_grad(logits.cuda())
    tol = TOLERANCE[dtype]
    assert_close(e_gpu.cpu(), e_cpu, tol, "energy cuda vs cpu")
    assert_close(g_gpu.cpu(), g_cpu, tol, "grad cuda vs cpu")


def test_energy_is_never_positive():
    """A property of E (not of an implementation): each term s (1 - e^s) <= 0, with equality only at s = 0."""
    logits = torch.randn(64, 10) * 3
    assert (ops.modified_energy(logits) <= 0).all()
    assert ops.modified_energy(torch.zeros(2, 7)).abs().max() == 0
    assert math.isclose(ops.modified_energy(torch.full((1, 1), 5.0)).item(), 1 - math.e, rel_tol=1e-6)
