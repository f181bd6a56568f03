import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, HALF_DTYPES, TOLERANCE, assert_close, layouts, native_ops, needs_native

SHAPES = [(0, 10), (1, 1), (7, 1), (33, 10), (128, 100), (5, 1000)]


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + HALF_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_energy_and_grad_match_reference(device, dtype, shape):
    logits = (torch.randn(shape, dtype=torch.float64) * 4).to(device=device, dtype=dtype)
    for layout, x in layouts(logits):
        with native_ops():
            energy = ops.modified_energy(x, c=5.0)
            e2, grad = ops.modified_energy_grad(x, c=5.0)
        want_e, want_g = reference.modified_energy_grad(x.double(), c=5.0)
        assert energy.dtype == dtype and grad.dtype == dtype and energy.shape == (shape[0],)
        assert_close(energy, want_e, TOLERANCE[dtype], f"energy {layout}")
        assert_close(e2, want_e, TOLERANCE[dtype], f"energy (grad op) {layout}")
        assert_close(grad, want_g, TOLERANCE[dtype], f"grad {layout}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_grad_op_equals_autograd_of_reference(device):
    logits = torch.randn(16, 7, dtype=torch.float64, device=device, requires_grad=True)
    (want,) = torch.autograd.grad(reference.modified_energy(logits, 3.0).sum(), logits)
    with native_ops():
        _, grad = ops.modified_energy_grad(logits.detach(), 3.0)
    assert_close(grad, want, 1e-12, "dE/df")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed):
    torch.manual_seed(seed)
    logits = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    with native_ops():
        assert torch.autograd.gradcheck(lambda f: ops.modified_energy(f, 5.0), (logits,))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_reference_autograd(device):
    logits = torch.randn(32, 10, device=device) * 3
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.randn(32, device=device)
    with native_ops():
        (ops.modified_energy(a) * w).sum().backward()
    (reference.modified_energy(b) * w).sum().backward()
    assert_close(a.grad, b.grad, 2e-5, "backward")


def test_single_class_closed_form():
    f = torch.tensor([[2.0], [-1.0]], dtype=torch.float64)
    s = f / 5.0
    assert_close(ops.modified_energy(f), (s * (1 - s.exp())).squeeze(1), 1e-12, "C=1")


@needs_native
def test_nan_propagates_like_reference():
    logits = torch.randn(4, 6)
    logits[1, 2] = float("nan")
    with native_ops():
        energy, grad = ops.modified_energy_grad(logits)
    want_e, want_g = reference.modified_energy_grad(logits)
    assert_close(energy, want_e, 2e-5, "energy with NaN")
    assert_close(grad, want_g, 2e-5, "grad with NaN")


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


@pytest.mark.parametrize("bad, match", [
    (torch.randn(3), "logits must have 2 dimensions"),
    (torch.randint(0, 3, (3, 4)), "floating dtype"),
    ("not a tensor", "torch.Tensor"),
])
def test_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.modified_energy(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.modified_energy_grad(bad)


def test_bad_c():
    with pytest.raises(ValueError, match="c must be"):
        ops.modified_energy(torch.randn(2, 3), c=0.0)


@needs_native
def test_native_checks_name_the_argument():
    with pytest.raises(RuntimeError, match="logits must be 2-D"):
        torch.ops.fastood.modified_energy(torch.randn(3), 5.0)
