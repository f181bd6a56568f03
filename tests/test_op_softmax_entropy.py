"""fastood.ops.softmax_entropy (entropy of softmax per row) against the pure-PyTorch reference."""
import math

import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
import op_helpers
from op_helpers import DEVICES, HALF_DTYPES, TOLERANCE, all_layouts, assert_close, native_ops, needs_native

ALL_DTYPES = [torch.float32, torch.float64] + HALF_DTYPES
# B = 0, C = 0, C = 1, C below / above one CPU vector (16 floats), C above one CUDA warp's row (1024) and
# above what a CUDA block keeps in registers (8192 floats).
SHAPES = [(0, 10), (4, 0), (1, 1), (9, 1), (33, 10), (128, 100), (4, 1000), (3, 2053), (2, 9000)]


def sample_logits(shape, dtype, device, scale=3.0):
    return op_helpers.sample_logits(shape, dtype, device, scale)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(device, dtype, shape):
    logits = sample_logits(shape, dtype, device)
    g = torch.randn(shape[0], dtype=torch.float64, device=device).to(dtype)
    for layout, x in all_layouts(logits):
        with native_ops():
            h = ops.softmax_entropy(x)
            grad = torch.ops.fastood.softmax_entropy_backward(g, x)
        assert h.dtype == dtype and h.shape == (shape[0],)
        assert grad.dtype == dtype and grad.shape == shape and grad.is_contiguous()
        assert_close(h, reference.softmax_entropy(x.double()), TOLERANCE[dtype], f"entropy {layout}")
        want = reference.softmax_entropy_backward(g.double(), x.double())
        assert_close(grad, want, TOLERANCE[dtype], f"backward {layout}")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_row_length_up_to_three_vectors(dtype):
    """Full vector blocks plus a masked partial block: every remainder of the CPU's 16 (8 for float64) lanes."""
    for cols in range(1, 50):
        logits = sample_logits((3, cols), dtype, "cpu")
        g = torch.randn(3, dtype=dtype)
        with native_ops():
            h = ops.softmax_entropy(logits)
            grad = torch.ops.fastood.softmax_entropy_backward(g, logits)
        assert_close(h, reference.softmax_entropy(logits.double()), TOLERANCE[dtype], f"entropy C={cols}")
        want = reference.softmax_entropy_backward(g.double(), logits.double())
        assert_close(grad, want, TOLERANCE[dtype], f"backward C={cols}")


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
    logits = (torch.randn(5, 23, dtype=torch.float64, device=device) * (1 + 2 * seed)).requires_grad_()
    with native_ops():
        assert torch.autograd.gradcheck(ops.softmax_entropy, (logits,))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.float64, 1e-10), (torch.bfloat16, 1e-1)])
def test_backward_matches_reference_autograd(device, dtype, tol):
    logits = sample_logits((32, 10), dtype, device)
    op_helpers.check_backward_matches_reference(ops.softmax_entropy, reference.softmax_entropy, logits, tol)


@needs_native
def test_backward_takes_expanded_and_wider_incoming_gradients():
    logits = sample_logits((6, 9), torch.float32, "cpu")
    want = reference.softmax_entropy_backward(torch.full((6,), 2.5), logits)
    with native_ops():
        expanded = torch.ops.fastood.softmax_entropy_backward(torch.tensor([2.5]).expand(6), logits)
        wider = torch.ops.fastood.softmax_entropy_backward(torch.full((6,), 2.5, dtype=torch.float64), logits)
    assert expanded.dtype == torch.float32 and wider.dtype == torch.float32
    assert_close(expanded, want, 2e-5, "expanded grad_entropy")
    assert_close(wider, want, 2e-5, "float64 grad_entropy")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_stable_for_huge_logits(device, dtype):
    rows = [[1e4, -1e4, 0.0], [1e4, 1e4, -1e4], [-1e4, -1e4, -1e4], [1e4, 1e4 - 1.0, -1e4]]
    logits = torch.tensor(rows, device=device, dtype=dtype)
    x = logits.clone().requires_grad_()
    with native_ops():
        h = ops.softmax_entropy(x)
        h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(x.grad).all()
    # The last row's two top logits are 1 apart only in float32/float64 (float16/bfloat16 round them together).
    p = torch.softmax(logits[3].double(), dim=0)
    want = torch.tensor([0.0, math.log(2.0), math.log(3.0), -(p * p.clamp_min(1e-300).log()).sum().item()])
    tol = 1e-2 if dtype in HALF_DTYPES else 1e-6
    assert_close(h.double().cpu(), want, tol, "entropy at +-1e4")
    assert_close(x.grad.double().cpu(), reference.softmax_entropy_backward(torch.ones(4, device=device), logits).double().cpu(),
                 tol, "gradient at +-1e4")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_single_class_has_zero_entropy_and_gradient(backend):
    if backend == "native" and not ops.native_available():
        pytest.skip("native extension not built")
    x = (torch.randn(5, 1) * 10).requires_grad_()
    with ops.use_backend(backend):
        h = ops.softmax_entropy(x)
        h.sum().backward()
    assert torch.equal(h, torch.zeros(5))
    assert torch.equal(x.grad, torch.zeros(5, 1))


def test_entropy_lies_between_zero_and_log_c():
    logits = torch.randn(64, 10) * 5
    h = ops.softmax_entropy(logits)
    assert (h >= 0).all() and (h <= math.log(10) + 1e-6).all()
    assert_close(ops.softmax_entropy(torch.full((3, 10), 7.0)), torch.full((3,), math.log(10)), 1e-6, "uniform")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nan_and_inf_propagate_like_reference(device, dtype):
    """A row holding NaN, +inf or -inf gives the reference's NaNs (forward and backward); other rows are finite."""
    logits = sample_logits((5, 20), dtype, device)
    logits[1, 2] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 19] = float("-inf")
    logits[4, :] = float("-inf")
    g = torch.randn(5, device=device).to(dtype)
    with native_ops():
        h = ops.softmax_entropy(logits)
        grad = torch.ops.fastood.softmax_entropy_backward(g, logits)
    want_h = reference.softmax_entropy(logits)
    want_g = reference.softmax_entropy_backward(g, logits)
    assert torch.isfinite(h[0]) and torch.isfinite(grad[0]).all()
    torch.testing.assert_close(h, want_h, equal_nan=True, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    torch.testing.assert_close(grad, want_g, equal_nan=True, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = torch.randn(8, 5, device=device, requires_grad=True)
    opcheck(torch.ops.fastood.softmax_entropy.default, (logits,))
    opcheck(torch.ops.fastood.softmax_entropy_backward.default, (torch.randn(8, device=device), logits.detach()))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_keeps_the_gradient_for_the_backward(device, dtype, shape):
    """CPU and CUDA logits that require grad take softmax_entropy_with_grad: the forward writes dH/df, the
    backward scales it by the incoming gradient. Same entropy as the plain forward, the plain backward's values
    (bit for bit at an incoming gradient of 1 on CPU; within one rounding of the logits' dtype on CUDA, whose plain
    backward rounds once from float while this path rounds dH/df to float first), the reference's within
    tolerance, NaN/inf rows as the reference."""
    if device == "cuda" and not ops.cuda_kernels_available():
        pytest.skip("fastood built without CUDA kernels")
    logits = sample_logits(shape, dtype, device)
    if shape[0] >= 5 and shape[1] >= 3:
        logits[1, 2] = float("nan")
        logits[2, 0] = float("inf")
        logits[3, -1] = float("-inf")
    g = torch.randn(shape[0], dtype=torch.float64).to(dtype)
    with native_ops():
        x = logits.clone().requires_grad_()
        h = ops.softmax_entropy(x)
        assert "softmax_entropy_with_grad" in h.grad_fn.name()
        (grad_one,) = torch.autograd.grad(h.sum(), x, retain_graph=True)
        (grad,) = torch.autograd.grad(h, x, g)
        plain_h = torch.ops.fastood.softmax_entropy(logits)
        plain_one = torch.ops.fastood.softmax_entropy_backward(torch.ones(shape[0], dtype=dtype, device=device),
                                                               logits)
    assert grad.dtype == dtype and grad.shape == shape
    torch.testing.assert_close(h.detach(), plain_h, rtol=0, atol=0, equal_nan=True)
    exact = device == "cpu" or dtype == torch.float32
    tol = 0 if exact else TOLERANCE[dtype]
    torch.testing.assert_close(grad_one, plain_one, rtol=tol, atol=tol, equal_nan=True)
    want = reference.softmax_entropy_backward(g.double().to(device), logits.double())
    torch.testing.assert_close(grad.double(), want, equal_nan=True, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@needs_native
def test_cpu_forward_without_grad_computes_no_gradient():
    """Without a backward to follow (no grad needed, or grad mode off) the plain forward runs."""
    logits = torch.randn(4, 7)
    with native_ops():
        assert ops.softmax_entropy(logits).grad_fn is None
        with torch.no_grad():
            assert ops.softmax_entropy(logits.requires_grad_()).grad_fn is None


@needs_native
def test_with_grad_ops_opcheck_and_errors():
    logits = torch.randn(8, 5, requires_grad=True)
    opcheck(torch.ops.fastood.softmax_entropy_with_grad.default, (logits,))
    d = torch.ops.fastood.softmax_entropy_with_grad(logits.detach())[1]
    opcheck(torch.ops.fastood.softmax_entropy_backward_from_grad.default, (torch.randn(8), d, torch.bfloat16))
    with pytest.raises(RuntimeError, match="float64 logits take fastood::softmax_entropy"):
        torch.ops.fastood.softmax_entropy_with_grad(logits.detach().double())
    with pytest.raises(RuntimeError, match="dentropy must be the float32"):
        torch.ops.fastood.softmax_entropy_backward_from_grad(torch.randn(8), d.double(), torch.float32)
    with pytest.raises(RuntimeError, match=r"grad_entropy must be \[8\]"):
        torch.ops.fastood.softmax_entropy_backward_from_grad(torch.randn(7), d, torch.float32)


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
    torch.testing.assert_close(out, reference.softmax_entropy(logits.detach()).mean())
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("bad, error, match", [
    (torch.randn(2, 3, 4), ValueError, "logits must have 2 dimensions, got shape \\(2, 3, 4\\)"),
    (torch.randn(4), ValueError, "logits must have 2 dimensions"),
    (torch.zeros(3, 4, dtype=torch.int64), TypeError, "logits must have a floating dtype .*got torch.int64"),
    ([[1.0, 2.0]], TypeError, "logits must be a torch.Tensor, got list"),
])
def test_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        ops.softmax_entropy(bad)


@needs_native
def test_native_checks_name_the_argument():
    F = torch.ops.fastood
    with pytest.raises(RuntimeError, match=r"logits must be 2-D \[B, C\], got shape \[4\]"):
        F.softmax_entropy(torch.randn(4))
    with pytest.raises(RuntimeError, match="logits must have dtype float16, bfloat16, float32 or float64, got Int"):
        F.softmax_entropy(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"grad_entropy must have shape \[4\], got \[3\]"):
        F.softmax_entropy_backward(torch.randn(3), torch.randn(4, 5))
    with pytest.raises(RuntimeError, match=r"grad_entropy must be 1-D \[B\], got shape \[4, 1\]"):
        F.softmax_entropy_backward(torch.randn(4, 1), torch.randn(4, 5))


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_native_rejects_mixed_devices():
    with pytest.raises(RuntimeError, match="grad_entropy must be on the same device as logits"):
        torch.ops.fastood.softmax_entropy_backward(torch.randn(4), torch.randn(4, 5, device="cuda"))


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cuda_matches_cpu(dtype):
    logits = sample_logits((300, 777), dtype, "cpu")
    g = torch.randn(300).to(dtype)
    with native_ops():
        h_cpu, h_gpu = ops.softmax_entropy(logits), ops.softmax_entropy(logits.cuda())
        b_cpu = torch.ops.fastood.softmax_entropy_backward(g, logits)
        b_gpu = torch.ops.fastood.softmax_entropy_backward(g.cuda(), logits.cuda())
    assert_close(h_gpu.cpu(), h_cpu, TOLERANCE[dtype], "entropy cuda vs cpu")
    assert_close(b_gpu.cpu(), b_cpu, TOLERANCE[dtype], "backward cuda vs cpu")
