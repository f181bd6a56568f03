"""The reference backend as ground truth (issue 15, item 6): float64 bounds and a step in x's dtype for
langevin_step_, power-of-two rescaled norms in nullspace_project, expm1 in modified_energy; the native kernels
must agree with it on each of these cases."""
import pytest
import torch

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, assert_close, needs_native

BACKENDS = [pytest.param("native", marks=needs_native), "reference"]


def run_step(backend, x, grad, step_size, lower, upper):
    with ops.use_backend(backend):
        return ops.langevin_step_(x, grad, step_size, 0.0, lower, upper)


# ---------------------------------------------------------------------------------------------- langevin_step_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_float64_x_keeps_float64_per_channel_bounds(device, backend, as_tensor):
    """x = -5 clamped to lower [-0.1, -0.3] is exactly -0.1 / -0.3 in float64 (the reference used to round the
    bounds to float32: -0.10000000149)."""
    x = torch.full((2, 2, 3), -5.0, dtype=torch.float64, device=device)
    lower, upper = [-0.1, -0.3], [1.0, 2.0]
    if as_tensor:
        lower, upper = torch.tensor(lower, dtype=torch.float64), torch.tensor(upper, dtype=torch.float64)
    run_step(backend, x, torch.zeros_like(x), 0.0, lower, upper)
    assert (x[:, 0] == -0.1).all() and (x[:, 1] == -0.3).all(), x[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16])
def test_step_in_x_dtype_not_grad_dtype(device, backend, grad_dtype):
    """float64 x with a float32/float16 gradient moves by exactly step/2 in float64 (the reference used to round
    the step to the gradient's dtype: 0.05 -> 0.05000000074505806)."""
    x = torch.zeros(3, 2, 4, dtype=torch.float64, device=device)
    grad = torch.ones(3, 2, 4, dtype=grad_dtype, device=device)
    grad[1] = -1.0
    run_step(backend, x, grad, 0.1, -1.0, 1.0)
    want = torch.full_like(x, -0.05)
    want[1] = 0.05
    assert torch.equal(x, want), (x - want).abs().max()


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_and_reference_steps_agree_bitwise_for_float64(device):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 0.3).to(device)
    grad = torch.randn(4, 3, 5, 5, generator=g).to(device)   # float32
    bounds = ([-0.1, -0.3, -0.7], [0.2, 0.35, 0.9])
    out = [run_step(b, x0.clone(), grad, 0.03, *bounds) for b in ("native", "reference")]
    assert torch.equal(out[0], out[1])


# ------------------------------------------------------------------------------------------- nullspace_project
@needs_native
@pytest.mark.parametrize("dtype, scales", [
    (torch.float32, [(1.0, 1e-19), (1.0, 1e-25), (1.0, 1e30), (1e-20, 1.0), (1e18, 1e-19), (1e-15, 1e30)]),
    (torch.float64, [(1.0, 1e-160), (1.0, 1e200), (1e-200, 1e180), (1e170, 1.0)]),
])
def test_reference_nullspace_survives_extreme_scales(dtype, scales):
    """|P r| must neither underflow nor overflow: float32 |r| ~ 1e-19 (|r|^2 below float32's smallest normal) or
    1e30 used to give zero vectors in the reference; reference and native agree, unit norm, at every scale."""
    g = torch.Generator().manual_seed(1)
    jac64, r64 = torch.randn(len(scales), 24, 3, generator=g, dtype=torch.float64), torch.randn(len(scales), 24, generator=g, dtype=torch.float64)
    s_j = torch.tensor([s for s, _ in scales], dtype=torch.float64)
    s_r = torch.tensor([s for _, s in scales], dtype=torch.float64)
    jac, r = (jac64 * s_j[:, None, None]).to(dtype), (r64 * s_r[:, None]).to(dtype)
    assert torch.isfinite(jac).all() and torch.isfinite(r).all() and (r != 0).all()
    want = reference.nullspace_project(jac64, r64)          # v does not depend on the scales
    with ops.use_backend("reference"):
        got_ref = ops.nullspace_project(jac, r)
    with ops.use_backend("native"):
        got_native = ops.nullspace_project(jac, r)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(got_ref, want, tol, "reference at extreme scales")
    assert_close(got_native, got_ref, tol, "native vs reference at extreme scales")
    assert_close(got_ref.double().norm(dim=1), torch.ones(len(scales), dtype=torch.float64), tol, "unit norm")


def test_reference_nullspace_scaling_is_exact_at_ordinary_scales():
    """Dividing by powers of two changes only exponents: the result is bit-identical to the same projection of the
    rescaled inputs."""
    g = torch.Generator().manual_seed(2)
    jac, r = torch.randn(3, 20, 4, generator=g), torch.randn(3, 20, generator=g)
    assert torch.equal(reference.nullspace_project(jac, r), reference.nullspace_project(jac * 2.0 ** 40, r * 2.0 ** -30))


# ---------------------------------------------------------------------------------------------- modified_energy
def exact_energy(logits, c):
    """E and dE/df in float64 from the given logits, with expm1 (no cancellation near 0)."""
    s = logits.double() / c
    return (-s * torch.expm1(s)).sum(1), (-torch.expm1(s) - s * torch.exp(s)) / c


def small_logits(dtype, c):
    """Rows of |f/c| from 1e-7 to 1e-2 (both signs): where 1 - exp(s) cancels."""
    s = torch.tensor([[1e-5, 2e-5, -1e-5, 3e-5], [1e-7, -3e-7, 5e-7, 1e-6], [1e-3, -2e-3, 1e-2, 5e-4]],
                     dtype=torch.float64)
    return (s * c).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_modified_energy_exact_for_small_logits(device, backend, dtype, tol):
    """Relative error of E and dE/df at |f/c| down to 1e-7 (1 - exp(s) gave 1.4e-3 at 1e-5 in float32)."""
    c = 5.0
    logits = small_logits(dtype, c).to(device)
    want_e, want_g = exact_energy(logits, c)
    with ops.use_backend(backend):
        energy = ops.modified_energy(logits, c)
        e2, grad = ops.modified_energy_grad(logits, c)
        x = logits.clone().requires_grad_()
        (bw,) = torch.autograd.grad(ops.modified_energy(x, c).sum(), x)
    for got, want, what in ((energy, want_e, "E"), (e2, want_e, "E of modified_energy_grad"),
                            (grad, want_g, "dE/df"), (bw, want_g, "backward")):
        rel = ((got.double() - want) / want).abs().max().item()
        assert rel <= tol, f"{backend} {what}: max relative error {rel:.3e} > {tol:.0e}"
