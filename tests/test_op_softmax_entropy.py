import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, HALF_DTYPES, TOLERANCE, assert_close, layouts, native_ops, needs_native

SHAPES = [(0, 10), (1, 1), (9, 1), (33, 10), (128, 100), (4, 1000)]


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + HALF_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(device, dtype, shape):
    logits = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    g = torch.randn(shape[0], dtype=torch.float64, device=device).to(dtype)
    for layout, x in layouts(logits):
        with native_ops():
            h = ops.softmax_entropy(x)
            grad = torch.ops.fastood.softmax_entropy_backward(g, x)
        assert h.dtype == dtype and h.shape == (shape[0],)
        assert_close(h, reference.softmax_entropy(x.double()), TOLERANCE[dtype], f"entropy {layout}")
        want = reference.softmax_entropy_backward(g.double(), x.double())
        assert_close(grad, want, TOLERANCE[dtype], f"backward {layout}")


def test_reference_backward_is_the_gradient():
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, dtype=torch.float64)
    (want,) = torch.autograd.grad((reference.softmax_entropy(logits) * g).sum(), logits)
    assert_close(reference.softmax_entropy_backward(g, logits.detach()), want, 1e-12, "reference backward")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed):
    torch.manual_seed(seed)
    logits = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    with native_ops():
        assert torch.autograd.gradcheck(ops.softmax_entropy, (logits,))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stable_for_huge_logits(device, dtype):
    logits = torch.tensor([[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4]], device=device, dtype=dtype)
    x = logits.clone().requires_grad_()
    with native_ops():
        h = ops.softmax_entropy(x)
        h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(x.grad).all()
    want = torch.tensor([0.0, torch.log(torch.tensor(2.0)).item(), torch.log(torch.tensor(3.0)).item()])
    assert_close(h.float().cpu(), want, 1e-2 if dtype == torch.bfloat16 else 1e-6, "entropy at +-1e4")


def test_single_class_has_zero_entropy():
    assert torch.equal(ops.softmax_entropy(torch.randn(5, 1)), torch.zeros(5))


@needs_native
def test_nan_propagates_like_reference():
    logits = torch.randn(4, 6)
    logits[2, 0] = float("nan")
    with native_ops():
        h = ops.softmax_entropy(logits)
    assert_close(h, reference.softmax_entropy(logits), 2e-5, "entropy with NaN")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = torch.randn(8, 5, device=device, requires_grad=True)
    opcheck(torch.ops.fastood.softmax_entropy.default, (logits,))
    opcheck(torch.ops.fastood.softmax_entropy_backward.default, (torch.randn(8, device=device), logits.detach()))


@needs_native
def test_torch_compile_fullgraph():
    def loss(logits):
        return ops.softmax_entropy(logits).mean()

    logits = torch.randn(8, 5, requires_grad=True)
    with native_ops():
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
        out = compiled(logits)
        (g1,) = torch.autograd.grad(out, logits)
        (g2,) = torch.autograd.grad(loss(logits), logits)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("bad, match", [
    (torch.randn(2, 3, 4), "logits must have 2 dimensions"),
    (torch.zeros(3, 4, dtype=torch.int64), "floating dtype"),
])
def test_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ops.softmax_entropy(bad)


@needs_native
def test_backward_shape_is_checked():
    with pytest.raises(RuntimeError, match="grad_entropy must have shape"):
        torch.ops.fastood.softmax_entropy_backward(torch.randn(3), torch.randn(4, 5))
