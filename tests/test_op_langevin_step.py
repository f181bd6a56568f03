"""fastood.ops.langevin_step_ (FIG's sign-gradient Langevin step): native kernels vs the reference, noise
statistics and reproducibility, the active mask, bounds, NaN handling, compile/opcheck and argument errors."""
import math

import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, TOLERANCE, assert_close, native_ops, needs_native

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(device, dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    grad.view(-1)[::7] = 0  # sign(0) = 0
    return x, grad


def _native_step(x, *args, **kwargs):
    with native_ops():
        return ops.langevin_step_(x, *args, **kwargs)


def _seeded_step(x, grad, seed, *args, **kwargs):
    torch.manual_seed(seed)
    return _native_step(x, grad, *args, **kwargs)


def _noise(device, shape=(64, 4, 32, 32), std=0.3, dtype=torch.float32, seed=0):
    """Pure noise samples: a step with zero gradient from x = 0 and wide bounds."""
    x = torch.zeros(shape, device=device, dtype=dtype)
    return _seeded_step(x, torch.zeros_like(x), seed, 0.0, std, -100.0, 100.0)


# ----------------------------------------------------------------------------------------------- no noise: exact


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (4, 3, 5, 5), (2, 10), (3, 2, 7), (2, 300), (3, 1, 9, 4),
                                   (2, 3, 2, 3, 4), (1, 2, 513)])
def test_zero_noise_matches_reference(device, dtype, shape):
    x, grad = _inputs(shape, device, dtype)
    a, b = x.clone(), x.clone()
    out = _native_step(a, grad, 0.1, 0.0, -0.6, 0.7)
    reference.langevin_step_(b, grad, 0.1, 0.0, -0.6, 0.7)
    assert out is a
    # float32/float64 are exact; half types compute in float32 in both and round once.
    tol = TOLERANCE[dtype] if dtype in (torch.float16, torch.bfloat16) else 0.0
    assert_close(a, b, tol, f"zero-noise step {dtype} {shape}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_x_and_grad(device, layout):
    base, grad = _inputs((4, 3, 6, 8), device)
    if layout == "transposed":
        x, g = base.transpose(2, 3), grad.transpose(2, 3)
    elif layout == "sliced":
        x, g = base[:, :, :, ::2], grad[:, :, :, 1::2]
    else:
        x, g = base.to(memory_format=torch.channels_last), grad.to(memory_format=torch.channels_last)
    x_ptr = x.data_ptr()
    want = x.clone()
    reference.langevin_step_(want, g, 0.2, 0.0, [-0.5, -0.4, -0.3], 0.5)
    _native_step(x, g, 0.2, 0.0, [-0.5, -0.4, -0.3], 0.5)
    assert x.data_ptr() == x_ptr
    assert_close(x, want, 0.0, layout)
    if layout != "channels_last":
        assert_close(base[:, :, :, ::2] if layout == "sliced" else base.transpose(2, 3), want, 0.0, "through the view")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_broadcast_grad_and_other_grad_dtype(device):
    x, grad = _inputs((3, 2, 4, 4), device)
    g = grad[:1].expand_as(x)  # stride 0 along the batch
    want = x.clone()
    reference.langevin_step_(want, g, 0.3, 0.0, -1.0, 1.0)
    y = x.clone()
    _native_step(y, g, 0.3, 0.0, -1.0, 1.0)
    assert_close(y, want, 0.0, "expanded grad")
    y = x.clone()
    _native_step(y, g.double() * 1e-300, 0.3, 0.0, -1.0, 1.0)  # only the sign counts, even below float32's range
    assert_close(y, want, 0.0, "float64 grad for float32 x")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_bounds(device):
    x, grad = _inputs((8, 3, 4, 4), device)
    x = x * 3
    lower, upper = [-1.0, -0.2, 0.0], [1.0, 0.3, 0.1]
    y = x.clone()
    _native_step(y, grad, 0.5, 0.3, lower, upper)  # with noise: bounds must still hold
    for ch in range(3):
        assert y[:, ch].min() >= lower[ch] and y[:, ch].max() <= upper[ch]
    assert (y[:, 1] == 0.3).any() and (y[:, 2] == 0.0).any(), "noise should push some values onto the bounds"
    for lo, hi in [(lower, upper), (torch.tensor(lower), torch.tensor(upper)), (tuple(lower), 0.2)]:
        want, got = x.clone(), x.clone()
        hi_ref = hi if not isinstance(hi, float) else [hi] * 3
        reference.langevin_step_(want, grad, 0.5, 0.0, torch.tensor(list(lo)), torch.tensor(list(hi_ref)))
        _native_step(got, grad, 0.5, 0.0, lo, hi)
        assert_close(got, want, 0.0, f"per-channel bounds given as {type(lo).__name__}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_per_channel_bounds_on_2d_x(device):
    x, grad = _inputs((5, 4), device)  # [B, C]: every element is its own channel plane
    lower, upper = [-0.1, -0.2, -0.3, -0.4], [0.1, 0.2, 0.3, 0.4]
    want, got = x.clone(), x.clone()
    reference.langevin_step_(want, grad, 0.5, 0.0, torch.tensor(lower), torch.tensor(upper))
    _native_step(got, grad, 0.5, 0.0, lower, upper)
    assert_close(got, want, 0.0, "[B, C] with per-channel bounds")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_equal_bounds_pin_x(device):
    x, grad = _inputs((4, 2, 3), device)
    _native_step(x, grad, 0.5, 1.0, 0.25, 0.25)
    assert torch.equal(x, torch.full_like(x, 0.25))


# ------------------------------------------------------------------------------------------------- active mask


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_active_mask_leaves_rows_bit_identical(device, dtype):
    x, grad = _inputs((6, 2, 3, 3), device, dtype)
    x[1, 0, 0, 0] = float("nan")  # an inactive row keeps even its NaN and out-of-bounds values
    x[3] = 7.0
    active = torch.tensor([True, False, True, False, False, True], device=device)
    before = x.clone()
    _native_step(x, grad, 0.3, 0.5, -1.0, 1.0, active=active)
    assert torch.equal(x[~active].view(torch.uint8), before[~active].view(torch.uint8))  # bits, NaN included
    assert not torch.equal(x[active], before[active])
    assert x[active].abs().max() <= 1.0


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_active_rows_get_the_same_noise_as_without_mask(device):
    # The noise of an element depends only on the seed and its index, so masking rows changes nothing else.
    x, grad = _inputs((5, 3, 4, 4), device)
    full, masked = x.clone(), x.clone()
    active = torch.tensor([True, False, True, True, False], device=device)
    _seeded_step(full, grad, 3, 0.1, 0.2, -2.0, 2.0)
    _seeded_step(masked, grad, 3, 0.1, 0.2, -2.0, 2.0, active=active)
    assert torch.equal(masked[active], full[active])
    assert torch.equal(masked[~active], x[~active])
    all_off = x.clone()
    _seeded_step(all_off, grad, 3, 0.1, 0.2, -2.0, 2.0, active=torch.zeros(5, dtype=torch.bool, device=device))
    assert torch.equal(all_off, x)


# ------------------------------------------------------------------------------------------------------- noise


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_seed_reproduces_noise(device):
    x, grad = _inputs((4, 3, 8, 8), device)
    runs = [_seeded_step(x.clone(), grad, seed, 0.1, 0.2, -5.0, 5.0) for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    # Consecutive calls draw fresh noise.
    torch.manual_seed(1)
    a = _native_step(x.clone(), grad, 0.1, 0.2, -5.0, 5.0)
    b = _native_step(x.clone(), grad, 0.1, 0.2, -5.0, 5.0)
    assert not torch.equal(a, b)


@needs_native
def test_noise_does_not_depend_on_thread_count():
    x, grad = _inputs((16, 3, 16, 16), "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _seeded_step(x.clone(), grad, 5, 0.1, 0.3, -5.0, 5.0)
        torch.set_num_threads(max(2, threads))
        many = _seeded_step(x.clone(), grad, 5, 0.1, 0.3, -5.0, 5.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_noise_follows_the_logical_element_order(device):
    # A non-contiguous x gets the noise a contiguous copy would get (noise is keyed by the logical index).
    base, grad = _inputs((3, 4, 5, 6), device)
    x = base.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    contiguous = base.clone()
    _seeded_step(x, grad, 11, 0.1, 0.3, -5.0, 5.0)
    _seeded_step(contiguous, grad, 11, 0.1, 0.3, -5.0, 5.0)
    assert torch.equal(x, contiguous)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_moments(device, dtype):
    std = 0.3
    z = _noise(device, std=std, dtype=dtype).double().flatten() / std
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n ** 0.5
    assert abs(z.std().item() - 1.0) < 4 * (0.5 / n) ** 0.5 + 1e-3
    assert abs((z ** 4).mean().item() - 3.0) < 0.05  # Gaussian kurtosis
    for k, p in [(1.0, 0.3173105), (2.0, 0.0455003), (3.0, 0.0026998)]:  # two-sided Gaussian tails
        frac = (z.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, f"P(|z| > {k}) = {frac}, want {p}"


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_uncorrelated(device):
    z = _noise(device, shape=(32, 4, 32, 32)).double().flatten()
    n = z.numel()
    for lag in (1, 2, 3, 64, 128, 256, 1024):  # neighbours, Box-Muller partners (64 apart), chunk strides
        corr = torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / n ** 0.5, f"lag {lag}: correlation {corr}"
    # Pairs of normals from one Box-Muller draw are independent: no dependence between their magnitudes.
    w = z.view(-1, 256)
    corr_sq = torch.corrcoef(torch.stack([w[:, :64].flatten() ** 2, w[:, 64:128].flatten() ** 2]))[0, 1].item()
    assert abs(corr_sq) < 5 / (n / 4) ** 0.5
    # Two calls in a row give independent noise.
    torch.manual_seed(0)
    x = torch.zeros(2, 64, 32, 32, device=device)
    _native_step(x[0], torch.zeros_like(x[0]), 0.0, 1.0, -100.0, 100.0)
    _native_step(x[1], torch.zeros_like(x[1]), 0.0, 1.0, -100.0, 100.0)
    corr = torch.corrcoef(x.flatten(1).double())[0, 1].item()
    assert abs(corr) < 5 / x[0].numel() ** 0.5


# ------------------------------------------------------------------------------------------------------ NaN/Inf


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise_std", [0.0, 0.2])
def test_nan_propagates_like_reference(device, noise_std):
    x, grad = _inputs((3, 2, 4), device)
    x[0, 0, 0] = float("nan")
    grad[1, 1, 1] = float("nan")
    x[2, 1, 2] = float("inf")
    want = x.clone()
    reference.langevin_step_(want, grad, 0.1, 0.0, -1.0, 1.0)
    got = _native_step(x.clone(), grad, 0.1, noise_std, -1.0, 1.0)
    assert torch.isnan(got[0, 0, 0])  # NaN in x survives the clamp
    assert got[2, 1, 2] == 1.0  # +Inf is clamped like any other value
    if noise_std == 0:
        assert_close(got, want, 0.0, "NaN propagation")  # sign(NaN grad) = 0, as torch.sign
    else:
        assert torch.isnan(got).sum() == 1


# --------------------------------------------------------------------------------------- empty input, dispatch


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs_are_a_no_op(device):
    for shape in [(0, 3, 4, 4), (2, 0, 4), (3, 2, 0)]:
        x = torch.zeros(shape, device=device)
        assert ops.langevin_step_(x, torch.zeros_like(x), 0.1, 0.1, -1.0, 1.0) is x


@needs_native
def test_native_op_handles_empty_batch_directly():
    x = torch.zeros(0, 3, 4)
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    torch.ops.fastood.langevin_step_(x, x.clone(), 0.1, 0.1, lo, hi, None)
    assert x.shape == (0, 3, 4)


def test_reference_backend_runs_the_same_step():
    x, grad = _inputs((4, 3, 5), "cpu")
    want = x.clone()
    reference.langevin_step_(want, grad, 0.2, 0.0, -0.3, 0.4)
    with ops.use_backend("reference"):
        got = ops.langevin_step_(x.clone(), grad, 0.2, 0.0, -0.3, 0.4)
        torch.manual_seed(0)
        noisy = ops.langevin_step_(x.clone(), grad, 0.2, 0.5, [-0.3, -0.2, -0.1], 0.4)
    assert_close(got, want, 0.0, "reference backend")
    assert noisy[:, 0].min() >= -0.3 and noisy[:, 2].min() >= -0.1 and noisy.max() <= 0.4


@needs_native
def test_opcheck():
    x, grad = _inputs((4, 3, 4, 4), "cpu")
    lo, hi = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    per_channel = torch.tensor([-0.5, -1.0, 0.0]), torch.tensor([0.5, 1.0, 0.5])  # float32 bounds are accepted
    opcheck(torch.ops.fastood.langevin_step_.default, (x, grad, 0.1, 0.0, lo, hi, None))
    opcheck(torch.ops.fastood.langevin_step_.default, (x, grad, 0.1, 0.0, *per_channel,
                                                       torch.tensor([True, False, True, True])))


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


# ------------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(step_size=-0.1), ValueError, "step_size must be a finite number >= 0, got -0.1"),
    (dict(step_size=math.inf), ValueError, "step_size must be a finite number >= 0, got inf"),
    (dict(noise_std=-1.0), ValueError, "noise_std must be a finite number >= 0"),
    (dict(noise_std=math.nan), ValueError, "noise_std must be a finite number >= 0"),
    (dict(lower=1.0, upper=0.0), ValueError, "lower must be <= upper"),
    (dict(lower=[0.0, 0.0]), ValueError, r"one value per channel \(3\), got 2"),
    (dict(upper=math.nan), ValueError, "upper must not contain NaN"),
    (dict(lower="low"), ValueError, "could not convert|lower"),
    (dict(active=torch.ones(3, dtype=torch.bool)), ValueError, r"active must have shape \[4\]"),
    (dict(active=torch.ones(4)), TypeError, "active must be a bool tensor of shape \\[4\\], got torch.float32"),
    (dict(active=[True] * 4), TypeError, "active must be a bool tensor"),
])
def test_bad_arguments(kwargs, exc, match):
    x, grad = _inputs((4, 3, 2, 2), "cpu")
    args = dict(step_size=0.1, noise_std=0.0, lower=-1.0, upper=1.0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        ops.langevin_step_(x, grad, **args)


def test_shape_dtype_and_device_errors():
    x, grad = _inputs((4, 3, 2, 2), "cpu")
    with pytest.raises(ValueError, match=r"grad must have the shape of x \(4, 3, 2, 2\), got \(2, 3, 2, 2\)"):
        ops.langevin_step_(x, grad[:2], 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(TypeError, match="x must have a floating dtype .* got torch.int64"):
        ops.langevin_step_(x.long(), grad, 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(TypeError, match="grad must have a floating dtype"):
        ops.langevin_step_(x, grad.int(), 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"x must be \[B, C, ...\] with 2 to 8 dimensions, got shape \(5,\)"):
        ops.langevin_step_(torch.zeros(5), torch.zeros(5), 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.langevin_step_([1.0, 2.0], grad, 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="grad must be on the same device as x"):
        ops.langevin_step_(x, grad.to("meta"), 0.1, 0.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="active must be on the same device as x"):
        ops.langevin_step_(x, grad, 0.1, 0.0, -1.0, 1.0, active=torch.ones(4, dtype=torch.bool, device="meta"))


@needs_native
def test_native_checks_name_the_argument():
    x, grad = _inputs((4, 3, 2, 2), "cpu")
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    op = torch.ops.fastood.langevin_step_
    with pytest.raises(RuntimeError, match=r"lower must have shape \[1\] or \[C\] = \[3\], got \[2\]"):
        op(x, grad, 0.1, 0.0, torch.zeros(2), hi, None)
    with pytest.raises(RuntimeError, match="upper must be a float32 or float64 tensor, got Long"):
        op(x, grad, 0.1, 0.0, lo, torch.ones(1, dtype=torch.long), None)
    with pytest.raises(RuntimeError, match="grad must have the shape of x"):
        op(x, grad[:, :2], 0.1, 0.0, lo, hi, None)
    with pytest.raises(RuntimeError, match="active must be a bool tensor, got Float"):
        op(x, grad, 0.1, 0.0, lo, hi, torch.ones(4))
    with pytest.raises(RuntimeError, match="noise_std must be >= 0"):
        op(x, grad, 0.1, -1.0, lo, hi, None)
    with pytest.raises(RuntimeError, match="x must have dtype float16, bfloat16, float32 or float64, got Int"):
        op(x.int(), grad, 0.1, 0.0, lo, hi, None)
