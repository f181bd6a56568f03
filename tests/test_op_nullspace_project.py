"""fastood.ops.nullspace_project (unit vectors in the left null space of J): native kernels vs float64 QR,
orthogonality, isotropy, rank deficiency and ill-conditioning, extreme scales, NaN, compile/opcheck, errors."""
import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from fastood.ops import reference
from op_helpers import DEVICES, assert_close, layouts, native_ops, needs_native

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def qr_reference64(jac, r):
    """Float64 QR projection: P r / |P r| with P = I - Q Q^T."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK's batched QR can take seconds with 2 threads on small CPUs
    try:
        q, _ = torch.linalg.qr(jac.double(), mode="reduced")
    finally:
        torch.set_num_threads(threads)
    p = r.double() - (q @ (q.transpose(1, 2) @ r.double().unsqueeze(2))).squeeze(2)
    return p / p.norm(dim=1, keepdim=True)


def project(jac, r):
    with native_ops():
        return ops.nullspace_project(jac, r)


def orthogonality(jac, v):
    """max_i |J_i . v| / |J_i| over the nonzero columns i of every sample."""
    jt_v = (jac.double().transpose(1, 2) @ v.double().unsqueeze(2)).squeeze(2)
    col_norm = jac.double().norm(dim=1)
    return (jt_v.abs() / col_norm.clamp_min(1e-300))[col_norm > 0].max().item()


def conditioned_jacobian(b, d_out, d, smallest, dtype, device, seed=0):
    """J = U diag(s) V^T with singular values s spread log-uniformly from 1 down to ``smallest``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(b, d_out, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), d, dtype=torch.float64)
    return ((u * s) @ v.transpose(1, 2)).to(device, dtype)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2, 1), (5, 50, 4), (4, 37, 13), (16, 784, 8), (3, 300, 64), (2, 120, 33),
                                   (1, 20000, 8)])
def test_matches_qr_reference(device, dtype, shape):
    b, d_out, d = shape
    jac = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(b, d_out, dtype=dtype, device=device)
    v = project(jac, r)
    assert v.dtype == dtype and v.shape == (b, d_out) and v.is_contiguous()
    assert_close(v, qr_reference64(jac, r), TOL[dtype], f"vs float64 QR {shape}")
    assert orthogonality(jac, v) < TOL[dtype], "J^T v not ~0"
    assert_close(v.double().norm(dim=1), torch.ones(b, dtype=torch.float64, device=device), TOL[dtype], "unit norm")
    if dtype == torch.float64:
        assert_close(v, reference.nullspace_project(jac.cpu(), r.cpu()).to(device), 1e-10, "vs fastood.ops.reference")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    jac = torch.randn(4, 30, 6, device=device, dtype=torch.float64)
    r = torch.randn(4, 30, device=device, dtype=torch.float64)
    want = qr_reference64(jac, r)
    for (jname, j), (rname, rr) in zip(layouts(jac), layouts(r)):
        assert_close(project(j, rr), want, 1e-10, f"jac {jname}, r {rname}")
    sliced = torch.randn(8, 30, 6, device=device, dtype=torch.float64)[::2]  # batch stride 2
    assert_close(project(sliced, r), qr_reference64(sliced, r), 1e-10, "batch-sliced jac")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_isotropy(device):
    # v = P r/|P r| with r ~ N(0, I) is uniform on the unit sphere of the null space: E[v v^T] = P / (D - d).
    g = torch.Generator().manual_seed(0)
    d_out, d, n = 6, 2, 20000
    jac = torch.randn(1, d_out, d, generator=g, dtype=torch.float64).expand(n, d_out, d).to(device)
    r = torch.randn(n, d_out, generator=g, dtype=torch.float64).to(device)
    v = project(jac, r)
    second_moment = v.T @ v / n
    q, _ = torch.linalg.qr(jac[0])
    projector = torch.eye(d_out, dtype=torch.float64, device=device) - q @ q.T
    # Each entry of the average has a standard error of ~0.0015 here (E[v_i^2 v_j^2] <= 1/24 on the 3-sphere of
    # the 4-D null space), so 0.01 is ~7 standard errors; a bias such as a direction of J left in is ~0.05+.
    assert (second_moment - projector / (d_out - d)).abs().max() < 0.01
    assert abs(torch.trace(second_moment).item() - 1.0) < 1e-12


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_jacobians_stay_finite(device, dtype):
    g = torch.Generator().manual_seed(1)
    col = torch.randn(3, 40, 1, generator=g, dtype=torch.float64).to(device, dtype)
    duplicate = torch.cat([col, col, 2 * col], dim=2)           # rank 1
    zero = torch.zeros(3, 40, 3, dtype=dtype, device=device)     # rank 0
    tiny = torch.cat([col, 1e-30 * torch.randn_like(col)], 2)   # one direction far below the ridge
    r = torch.randn(3, 40, generator=g, dtype=torch.float64).to(device, dtype)
    for name, jac in [("duplicate", duplicate), ("zero", zero), ("tiny", tiny)]:
        v = project(jac, r)
        assert torch.isfinite(v).all(), name
        assert_close(v.double().norm(dim=1), torch.ones(3, dtype=torch.float64, device=device), 1e-6, name)
        if name != "zero":
            assert orthogonality(col, v) < 1e-6, f"{name}: v not orthogonal to the nonzero column"
    assert_close(project(zero, r), r / r.norm(dim=1, keepdim=True), 1e-6, "zero J leaves r's direction")
    # A duplicated column does not change the null space.
    assert_close(project(duplicate, r), project(col, r), 1e-6, "duplicate columns")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ill_conditioned_jacobians(device, dtype):
    r = torch.randn(4, 200, dtype=torch.float64).to(device, dtype)
    # Condition number 1e4: every direction is projected out to working accuracy.
    jac = conditioned_jacobian(4, 200, 16, 1e-4, dtype, device)
    v = project(jac, r)
    assert_close(v, qr_reference64(jac, r), 1e-9 if dtype == torch.float64 else 1e-5, "cond 1e4")
    # Condition number 1e8: the weakest directions fall below the ridge; the result stays finite, unit and
    # orthogonal to J up to those directions' tiny singular values.
    jac = conditioned_jacobian(4, 200, 16, 1e-8, dtype, device)
    v = project(jac, r)
    assert torch.isfinite(v).all()
    assert_close(v.double().norm(dim=1), torch.ones(4, dtype=torch.float64, device=device), 1e-6, "cond 1e8 norm")
    jt_v = (jac.double().transpose(1, 2) @ v.double().unsqueeze(2)).abs().max().item()
    assert jt_v < 1e-6  # |J^T v| <= sigma of the directions kept (<= ~1e-5 * sigma_max ... far below 1)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_j, scale_r", [(1e200, 1.0), (1e-200, 1.0), (1.0, 1e250), (1.0, 1e-250),
                                              (1e-160, 1e160), (1e150, 1e-300)])
def test_extreme_scales_float64(device, scale_j, scale_r):
    # The projection does not depend on the scale of J or r; Gram matrices outside float64's range are rescaled.
    jac = torch.randn(3, 50, 4, dtype=torch.float64, device=device)
    r = torch.randn(3, 50, dtype=torch.float64, device=device)
    assert_close(project(jac * scale_j, r * scale_r), qr_reference64(jac, r), 1e-12, f"J*{scale_j}, r*{scale_r}")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_projection_gives_zero_vector_not_nan(device, dtype):
    jac = torch.randn(3, 10, 3, dtype=dtype, device=device)
    r = torch.zeros(3, 10, dtype=dtype, device=device)
    r[1] = jac[1, :, 0]  # exactly a column of J: P r = 0 up to rounding
    v = project(jac, r)
    assert torch.isfinite(v).all()
    assert torch.equal(v[0], torch.zeros_like(v[0]))  # r == 0
    assert torch.equal(v[2], torch.zeros_like(v[2]))
    norm = v[1].double().norm().item()
    assert norm < 1e-6 or abs(norm - 1) < 1e-6  # rounding may leave a (then normalized) residue, never NaN


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_nan_or_inf_gives_nan_rows_only_there(device):
    jac = torch.randn(4, 20, 3, dtype=torch.float64, device=device)
    r = torch.randn(4, 20, dtype=torch.float64, device=device)
    jac[0, 5, 1] = float("nan")
    r[1, 7] = float("inf")
    jac[2, 0, 0] = float("-inf")
    v = project(jac, r)
    assert torch.isnan(v[:3]).all()
    assert_close(v[3:], qr_reference64(jac[3:], r[3:]), 1e-10, "the finite sample is unaffected")
    ref = reference.nullspace_project(jac, r)
    assert torch.isnan(ref[:3]).all(), "the reference propagates NaN/Inf the same way"
    assert_close(ref[3:], v[3:], 1e-10, "reference and native agree on the finite sample")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    out = ops.nullspace_project(torch.zeros(0, 10, 2, device=device), torch.zeros(0, 10, device=device))
    assert out.shape == (0, 10)


@needs_native
def test_native_op_handles_empty_batch_directly():
    out = torch.ops.fastood.nullspace_project(torch.zeros(0, 10, 2, dtype=torch.float64),
                                              torch.zeros(0, 10, dtype=torch.float64))
    assert out.shape == (0, 10) and out.dtype == torch.float64


def test_reference_backend():
    jac, r = torch.randn(3, 20, 4, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    with ops.use_backend("reference"):
        v = ops.nullspace_project(jac, r)
    assert_close(v, qr_reference64(jac, r), 1e-12, "reference backend")


@needs_native
def test_opcheck():
    opcheck(torch.ops.fastood.nullspace_project.default, (torch.randn(3, 20, 4), torch.randn(3, 20)))
    opcheck(torch.ops.fastood.nullspace_project.default,
            (torch.randn(2, 9, 70, dtype=torch.float64).transpose(1, 2)[:, :, :5], torch.randn(2, 70, dtype=torch.float64)))


@needs_native
def test_torch_compile_fullgraph():
    jac, r = torch.randn(3, 20, 4), torch.randn(3, 20)
    with native_ops():
        out = torch.compile(lambda j, x: ops.nullspace_project(j, x) * 2, fullgraph=True, backend="aot_eager")(jac, r)
        want = ops.nullspace_project(jac, r) * 2
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("jac, r, exc, match", [
    (torch.randn(2, 4, 4), torch.randn(2, 4), ValueError, "jac must have D > d .* got D=4, d=4"),
    (torch.randn(2, 3, 5), torch.randn(2, 3), ValueError, "jac must have D > d"),
    (torch.randn(2, 100, 65), torch.randn(2, 100), ValueError, r"d must be in \[1, 64\], got 65"),
    (torch.randn(2, 10, 0), torch.randn(2, 10), ValueError, r"d must be in \[1, 64\], got 0"),
    (torch.randn(2, 10, 3), torch.randn(2, 9), ValueError, r"r must have shape \[B, D\] = \[2, 10\] .* got \(2, 9\)"),
    (torch.randn(10, 3), torch.randn(10), ValueError, "jac must have 3 dimensions, got shape"),
    (torch.randn(2, 10, 3), torch.randn(20), ValueError, "r must have 2 dimensions"),
    (torch.randn(2, 10, 3).half(), torch.randn(2, 10).half(), TypeError, "jac must have a floating dtype .*float32, float64"),
    (torch.randint(0, 3, (2, 10, 3)), torch.randn(2, 10), TypeError, "jac must have a floating dtype"),
    (torch.randn(2, 10, 3), torch.randn(2, 10).double(), TypeError, "same dtype"),
    (torch.randn(2, 10, 3), torch.randn(2, 10, device="meta"), ValueError, "r must be on the same device as jac"),
    ([[1.0]], torch.randn(2, 10), TypeError, "jac must be a torch.Tensor"),
])
def test_bad_inputs(jac, r, exc, match):
    with pytest.raises(exc, match=match):
        ops.nullspace_project(jac, r)


@needs_native
def test_native_checks_name_the_argument():
    op = torch.ops.fastood.nullspace_project
    with pytest.raises(RuntimeError, match="jac must have D > d for a null space to exist, got D=3, d=3"):
        op(torch.randn(2, 3, 3), torch.randn(2, 3))
    with pytest.raises(RuntimeError, match=r"jac's latent size d must be in \[1, 64\], got 65"):
        op(torch.randn(2, 80, 65), torch.randn(2, 80))
    with pytest.raises(RuntimeError, match="r must have the dtype of jac"):
        op(torch.randn(2, 8, 3), torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="jac must have dtype float32 or float64, got Half"):
        op(torch.randn(2, 8, 3).half(), torch.randn(2, 8).half())
    with pytest.raises(RuntimeError, match=r"r must have shape \[B, D\] = \[2, 8\], got \[2, 7\]"):
        op(torch.randn(2, 8, 3), torch.randn(2, 7))
