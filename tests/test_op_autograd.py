"""Autograd safety of the native ops (issue 15, item 5): nullspace_project's backward (derived VJP) against
gradcheck and the reference's autograd, langevin_step_ as an in-place op (refuses tracked tensors, bumps the
version counter), and double backward through softmax_entropy / modified_energy."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, assert_close, native_ops, needs_native

BACKENDS = [pytest.param("native", marks=needs_native), "reference"]


@pytest.fixture(autouse=True)
def _one_thread():
    """gradcheck calls many tiny batched LAPACK ops; with 2 OpenMP threads on a loaded machine they take 15x
    longer than with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def native_project(jac, r):
    with native_ops():
        return ops.nullspace_project(jac, r)


def project_inputs(seed, b=3, d_out=12, d=4, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(b, d_out, d, generator=g, dtype=torch.float64).to(device, dtype)
    r = torch.randn(b, d_out, generator=g, dtype=torch.float64).to(device, dtype)
    return jac.requires_grad_(), r.requires_grad_()


def grads(fn, jac, r, weight):
    return torch.autograd.grad((fn(jac, r) * weight).sum(), (jac, r))


# ------------------------------------------------------------------------------------------ nullspace_project
@needs_native
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nullspace_project_gradcheck(seed):
    jac, r = project_inputs(seed)
    assert gradcheck(native_project, (jac, r))
    assert gradgradcheck(native_project, (jac, r))


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(4, 12, 4), (2, 50, 1), (2, 40, 13)])
def test_nullspace_project_grads_match_reference_autograd(device, dtype, tol, shape):
    jac, r = project_inputs(7, *shape, dtype=dtype, device=device)
    weight = torch.randn(shape[0], shape[1], dtype=dtype, device=device)
    got = grads(native_project, jac, r, weight)
    want = grads(reference.nullspace_project, jac, r, weight)
    for g, w, name in zip(got, want, ("jac", "r")):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close(g, w, tol, f"d/d{name}")


@needs_native
def test_nullspace_project_grad_of_one_input():
    jac, r = project_inputs(3)
    (g_r,) = torch.autograd.grad(native_project(jac.detach(), r).sum(), r)
    (g_j,) = torch.autograd.grad(native_project(jac, r.detach()).sum(), jac)
    want_j, want_r = grads(reference.nullspace_project, jac, r, torch.ones(3, 12, dtype=torch.float64))
    assert_close(g_r, want_r, 1e-10, "d/dr")
    assert_close(g_j, want_j, 1e-10, "d/djac")


@needs_native
def test_nullspace_project_backward_fills_grad_fields():
    """On the old code the output had a grad_fn but backward left jac.grad and r.grad None."""
    jac, r = project_inputs(4, dtype=torch.float32)
    native_project(jac, r).pow(2).mul(torch.arange(12.0)).sum().backward()
    assert jac.grad is not None and r.grad is not None
    assert torch.isfinite(jac.grad).all() and torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


@needs_native
def test_nullspace_project_grads_are_scale_invariant_at_extreme_scales():
    """v(s_j J, s_r r) = v(J, r), so dv/dr scales by 1/s_r and dv/dJ by 1/s_j, also where |J|^2 or |r|^2 leave
    the float64 range (the backward works on power-of-two rescaled inputs)."""
    jac, r = project_inputs(5)
    weight = torch.randn(3, 12, dtype=torch.float64)
    base_j, base_r = grads(native_project, jac, r, weight)
    for s_j, s_r in ((2.0 ** 600, 2.0 ** -700), (2.0 ** -600, 2.0 ** 700), (1.0, 2.0 ** 900)):
        jj = (jac.detach() * s_j).requires_grad_()
        rr = (r.detach() * s_r).requires_grad_()
        g_j, g_r = grads(native_project, jj, rr, weight)
        assert_close(g_j * s_j, base_j, 1e-10, f"d/djac at scales {s_j:g}, {s_r:g}")
        assert_close(g_r * s_r, base_r, 1e-10, f"d/dr at scales {s_j:g}, {s_r:g}")


@needs_native
def test_nullspace_project_grads_of_degenerate_rows():
    """A row with P r = 0 (v = 0) gets zero gradients, a row with NaN input NaN gradients; the
    other rows are unaffected."""
    jac, r = project_inputs(6)
    jac, r = jac.detach().clone(), r.detach().clone()
    r[0] = 0.0   # P r = 0 exactly: v = 0 and no gradient is defined
    r[1, 2] = float("nan")
    jac.requires_grad_(), r.requires_grad_()
    weight = torch.randn(3, 12, dtype=torch.float64)
    g_j, g_r = grads(native_project, jac, r, weight)
    assert torch.isnan(g_r[1]).all() and torch.isnan(g_j[1]).all()
    assert torch.equal(native_project(jac, r)[0], torch.zeros(12, dtype=torch.float64))
    assert torch.equal(g_r[0], torch.zeros_like(g_r[0])) and torch.equal(g_j[0], torch.zeros_like(g_j[0]))
    want_j, want_r = grads(reference.nullspace_project, jac[2:].detach().requires_grad_(),
                           r[2:].detach().requires_grad_(), weight[2:])
    assert_close(g_j[2:], want_j, 1e-10, "d/djac, regular row")
    assert_close(g_r[2:], want_r, 1e-10, "d/dr, regular row")


@needs_native
def test_nullspace_project_grads_with_rank_deficient_jacobian():
    """J = 0 gives v = r / |r| (the kernels' ridge), so dL/dr = (I - v v^T) g / |r| and no gradient for J; a zero
    column still gives finite gradients."""
    g = torch.Generator().manual_seed(11)
    jac = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    jac[0] = 0.0
    jac[1, :, 1] = 0.0
    r = torch.randn(2, 10, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 10, generator=g, dtype=torch.float64)
    g_j, g_r = grads(native_project, jac.requires_grad_(), r.requires_grad_(), weight)
    v = r[0].detach() / r[0].detach().norm()
    assert_close(g_r[0], (weight[0] - v * (v @ weight[0])) / r[0].detach().norm(), 1e-12, "d/dr at J = 0")
    assert torch.equal(g_j[0], torch.zeros_like(g_j[0]))
    assert torch.isfinite(g_j[1]).all() and torch.isfinite(g_r[1]).all()


@needs_native
def test_nullspace_project_opcheck_with_grad():
    jac, r = project_inputs(8, dtype=torch.float32)
    opcheck(torch.ops.fastood.nullspace_project.default, (jac, r),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@needs_native
def test_nullspace_project_backward_under_compile():
    jac, r = project_inputs(9, dtype=torch.float32)
    weight = torch.randn(3, 12)
    with native_ops():
        compiled = torch.compile(lambda j, x: (ops.nullspace_project(j, x) * weight).sum(), fullgraph=True,
                                 backend="aot_eager")
        got = torch.autograd.grad(compiled(jac, r), (jac, r))
    want = grads(native_project, jac, r, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------------------------- langevin_step_
def step(x, backend, grad=None):
    with ops.use_backend(backend):
        return ops.langevin_step_(x, torch.ones_like(x) if grad is None else grad, 0.1, 0.0, -1.0, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_langevin_step_refuses_a_leaf_that_requires_grad(backend):
    x = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place op"):
        step(x, backend)
    assert torch.equal(x.detach(), torch.zeros(2, 3))
    with torch.no_grad():   # allowed there, as for torch's own in-place ops (an optimizer's update)
        step(x, backend)
    assert torch.allclose(x.detach(), torch.full((2, 3), -0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_langevin_step_refuses_a_tensor_in_a_graph(backend):
    leaf = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable, but x requires grad"):
        step(leaf * 2, backend)


@needs_native
def test_native_op_called_directly_refuses_a_leaf_that_requires_grad():
    x = torch.zeros(2, 3, requires_grad=True)
    bound = torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place op"):
        torch.ops.fastood.langevin_step_(x, torch.ones(2, 3), 0.1, 0.0, -bound, bound, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [False, True])
def test_langevin_step_bumps_the_version_counter(backend, direct):
    """A tensor saved for backward and then stepped makes backward raise instead of silently using new values."""
    if direct and backend == "reference":
        pytest.skip("torch.ops.fastood is the native op")
    w = torch.ones(2, 3, requires_grad=True)
    x = torch.full((2, 3), 0.5)
    loss = (w * x).sum()          # saves x for d loss / d w
    before = x._version
    if direct:
        bound = torch.tensor([1.0], dtype=torch.float64)
        torch.ops.fastood.langevin_step_(x, torch.ones(2, 3), 0.1, 0.0, -bound, bound, None)
    else:
        step(x, backend)
    assert x._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ----------------------------------------------------------------------------------------------- double backward
ENERGY_OPS = [("softmax_entropy", ops.softmax_entropy, reference.softmax_entropy),
              ("modified_energy", lambda t: ops.modified_energy(t, 3.0), lambda t: reference.modified_energy(t, 3.0))]


@needs_native
@pytest.mark.parametrize("name, op, ref", ENERGY_OPS, ids=[e[0] for e in ENERGY_OPS])
def test_double_backward_gradgradcheck(name, op, ref):
    logits = (torch.randn(4, 6, dtype=torch.float64) * 2).requires_grad_()
    with native_ops():
        assert gradcheck(op, (logits,))
        assert gradgradcheck(op, (logits,))


@needs_native
@pytest.mark.parametrize("name, op, ref", ENERGY_OPS, ids=[e[0] for e in ENERGY_OPS])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_double_backward_matches_reference(name, op, ref, dtype, tol):
    """A gradient penalty |dE/dlogits|^2 differentiated again: native == reference autograd."""
    logits = (torch.randn(5, 7, dtype=torch.float64) * 2).to(dtype)
    results = []
    for fn, backend in ((op, "native"), (ref, "reference")):
        x = logits.clone().requires_grad_()
        with ops.use_backend(backend):
            (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        results.append(gg)
    assert_close(results[0], results[1], tol, f"{name} second derivative")


@needs_native
def test_backward_ops_are_differentiable():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, dtype=torch.float64, requires_grad=True)
    entropy_bw = torch.ops.fastood.softmax_entropy_backward
    energy_bw = lambda g, t: torch.ops.fastood.modified_energy_backward(g, t, 2.0)  # noqa: E731
    for fn in (entropy_bw, energy_bw):
        assert gradcheck(fn, (upstream, logits))
        assert gradgradcheck(fn, (upstream, logits))
