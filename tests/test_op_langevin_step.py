import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, TOLERANCE, assert_close, native_ops, needs_native


def _inputs(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(device, dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    grad.view(-1)[::7] = 0  # sign(0) = 0
    return x, grad


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 3, 5, 5), (2, 10), (3, 2, 7)])
def test_zero_noise_matches_reference_exactly(device, dtype, shape):
    x, grad = _inputs(shape, device, dtype)
    a, b = x.clone(), x.clone()
    with native_ops():
        out = ops.langevin_step_(a, grad, 0.1, 0.0, -0.6, 0.7)
    reference.langevin_step_(b, grad, 0.1, 0.0, -0.6, 0.7)
    assert out is a
    assert_close(a, b, TOLERANCE[dtype] if dtype in (torch.float16, torch.bfloat16) else 0.0, "zero-noise step")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_x_and_grad(device):
    base, grad = _inputs((4, 3, 6, 6), device)
    x = base.transpose(2, 3)  # non-contiguous view, updated in place
    g = grad.transpose(2, 3)
    want = x.clone()
    reference.langevin_step_(want, g, 0.2, 0.0, -0.5, 0.5)
    with native_ops():
        ops.langevin_step_(x, g, 0.2, 0.0, -0.5, 0.5)
    assert_close(x, want, 0.0, "non-contiguous")
    assert_close(base.transpose(2, 3), want, 0.0, "written through the view")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_bounds(device):
    x, grad = _inputs((8, 3, 4, 4), device)
    x = x * 3
    lower, upper = [-1.0, -0.2, 0.0], [1.0, 0.3, 0.1]
    want = x.clone()
    reference.langevin_step_(want, grad, 0.5, 0.0, torch.tensor(lower), torch.tensor(upper))
    with native_ops():
        ops.langevin_step_(x, grad, 0.5, 0.3, lower, upper)  # with noise: bounds must still hold
    for ch in range(3):
        assert x[:, ch].min() >= lower[ch] and x[:, ch].max() <= upper[ch]
    y, _ = _inputs((8, 3, 4, 4), device)
    y = y * 3
    want = y.clone()
    reference.langevin_step_(want, grad, 0.5, 0.0, torch.tensor(lower), torch.tensor(upper))
    with native_ops():
        ops.langevin_step_(y, grad, 0.5, 0.0, lower, upper)
    assert_close(y, want, 0.0, "per-channel, no noise")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_active_mask_leaves_rows_untouched(device):
    x, grad = _inputs((6, 2, 3, 3), device)
    active = torch.tensor([True, False, True, False, False, True], device=device)
    before = x.clone()
    with native_ops():
        ops.langevin_step_(x, grad, 0.3, 0.5, -1.0, 1.0, active=active)
    assert torch.equal(x[~active], before[~active])
    assert not torch.equal(x[active], before[active])


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproduces_noise(device):
    x, grad = _inputs((4, 3, 8, 8), device)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        y = x.clone()
        with native_ops():
            ops.langevin_step_(y, grad, 0.1, 0.2, -5.0, 5.0)
        runs.append(y)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_noise_moments(device):
    x = torch.zeros(64, 4, 32, 32, device=device)
    grad = torch.zeros_like(x)
    with native_ops():
        ops.langevin_step_(x, grad, 0.0, 0.3, -100.0, 100.0)
    n = x.numel()
    assert abs(x.mean().item()) < 4 * 0.3 / n ** 0.5
    assert abs(x.std().item() - 0.3) < 0.01
    # Noise is independent across elements: neighbouring values are uncorrelated.
    flat = x.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]
    assert abs(corr.item()) < 0.02


@needs_native
def test_nan_propagates_like_reference():
    x, grad = _inputs((3, 2, 4), "cpu")
    x[0, 0, 0] = float("nan")
    grad[1, 1, 1] = float("nan")
    want = x.clone()
    reference.langevin_step_(want, grad, 0.1, 0.0, -1.0, 1.0)
    with native_ops():
        ops.langevin_step_(x, grad, 0.1, 0.0, -1.0, 1.0)
    assert_close(x, want, 0.0, "NaN propagation")
    assert torch.isnan(x[0, 0, 0])  # NaN in x survives the clamp; sign(NaN grad) = 0 as torch.sign


def test_empty_batch_is_a_no_op():
    x = torch.zeros(0, 3, 4, 4)
    assert ops.langevin_step_(x, torch.zeros_like(x), 0.1, 0.1, -1.0, 1.0) is x


@needs_native
def test_opcheck():
    x, grad = _inputs((4, 3, 4, 4), "cpu")
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    opcheck(torch.ops.fastood.langevin_step_.default, (x, grad, 0.1, 0.0, lo, hi, None))
    opcheck(torch.ops.fastood.langevin_step_.default, (x, grad, 0.1, 0.0, lo, hi, torch.ones(4, dtype=torch.bool)))


@needs_native
def test_torch_compile_fullgraph():
    def step(x, grad):
        ops.langevin_step_(x, grad, 0.1, 0.0, -0.5, 0.5)
        return x * 2

    x, grad = _inputs((4, 3, 4, 4), "cpu")
    want = x.clone()
    reference.langevin_step_(want, grad, 0.1, 0.0, -0.5, 0.5)
    with native_ops():
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(x.clone(), grad)
    assert_close(out, want * 2, 0.0, "compiled step")


@pytest.mark.parametrize("kwargs, match", [
    (dict(step_size=-0.1), "step_size must be"),
    (dict(noise_std=-1.0), "noise_std must be"),
    (dict(lower=1.0, upper=0.0), "lower must be <= upper"),
    (dict(lower=[0.0, 0.0]), "one value per channel"),
    (dict(active=torch.ones(3, dtype=torch.bool)), "active must have shape"),
    (dict(active=torch.ones(4)), "active must have a floating dtype|active must have"),
])
def test_bad_arguments(kwargs, match):
    x, grad = _inputs((4, 3, 2, 2), "cpu")
    args = dict(step_size=0.1, noise_std=0.0, lower=-1.0, upper=1.0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.langevin_step_(x, grad, **args)


def test_shape_and_dtype_errors():
    x, grad = _inputs((4, 3, 2, 2), "cpu")
    with pytest.raises(ValueError, match="grad must have the shape of x"):
        ops.langevin_step_(x, grad[:2], 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        ops.langevin_step_(x.long(), grad, 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="x must have"):
        ops.langevin_step_(torch.zeros(5), torch.zeros(5), 0.1, 0.0, -1.0, 1.0)
