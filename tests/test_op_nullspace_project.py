import pytest
import torch
from torch.library import opcheck

import fastood.ops as ops
from op_helpers import DEVICES, assert_close, native_ops, needs_native


def qr_reference64(jac, r):
    """Float64 QR projection: P r / |P r| with P = I - Q Q^T."""
    q, _ = torch.linalg.qr(jac.double(), mode="reduced")
    p = r.double() - (q @ (q.transpose(1, 2) @ r.double().unsqueeze(2))).squeeze(2)
    return p / p.norm(dim=1, keepdim=True)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("shape", [(1, 2, 1), (5, 50, 4), (16, 784, 8), (3, 300, 64)])
def test_matches_qr_reference(device, dtype, tol, shape):
    b, d_out, d = shape
    jac = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(b, d_out, dtype=dtype, device=device)
    with native_ops():
        v = ops.nullspace_project(jac, r)
    assert v.dtype == dtype and v.shape == (b, d_out)
    assert_close(v, qr_reference64(jac, r), tol, "vs float64 QR")
    jt_v = (jac.double().transpose(1, 2) @ v.double().unsqueeze(2)).squeeze(2)
    col_norm = jac.double().norm(dim=1)
    assert (jt_v.abs() / col_norm).max() < tol, "J^T v not ~0"
    assert_close(v.double().norm(dim=1), torch.ones(b, dtype=torch.float64, device=device), tol, "unit norm")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    jac = torch.randn(4, 6, 30, device=device, dtype=torch.float64).transpose(1, 2)  # [4, 30, 6] non-contiguous
    r = torch.randn(30, 4, device=device, dtype=torch.float64).t()
    with native_ops():
        v = ops.nullspace_project(jac, r)
    assert_close(v, qr_reference64(jac, r), 1e-9, "non-contiguous")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_isotropy(device):
    # v = P r/|P r| with r ~ N(0, I) is uniform on the unit sphere of the null space: E[v v^T] = P / (D - d).
    torch.manual_seed(0)
    d_out, d, n = 6, 2, 20000
    jac = torch.randn(1, d_out, d, dtype=torch.float64, device=device).expand(n, d_out, d).contiguous()
    r = torch.randn(n, d_out, dtype=torch.float64, device=device)
    with native_ops():
        v = ops.nullspace_project(jac, r)
    second_moment = v.T @ v / n
    q, _ = torch.linalg.qr(jac[0])
    projector = torch.eye(d_out, dtype=torch.float64, device=device) - q @ q.T
    assert (second_moment - projector / (d_out - d)).abs().max() < 0.01


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_jacobians_stay_finite(device, dtype):
    col = torch.randn(3, 40, 1, dtype=dtype, device=device)
    duplicate = torch.cat([col, col, 2 * col], dim=2)           # rank 1
    zero = torch.zeros(3, 40, 3, dtype=dtype, device=device)     # rank 0
    tiny = torch.cat([col, 1e-30 * torch.randn_like(col)], 2)   # ill-conditioned
    r = torch.randn(3, 40, dtype=dtype, device=device)
    for name, jac in [("duplicate", duplicate), ("zero", zero), ("tiny", tiny)]:
        with native_ops():
            v = ops.nullspace_project(jac, r)
        assert torch.isfinite(v).all(), name
        assert_close(v.double().norm(dim=1), torch.ones(3, dtype=torch.float64, device=device), 1e-5, name)
        along_col = (col.squeeze(2).double() * v.double()).sum(1) / col.squeeze(2).double().norm(dim=1)
        if name != "zero":
            assert along_col.abs().max() < 1e-4, f"{name}: v not orthogonal to the nonzero column"
    with native_ops():
        v = ops.nullspace_project(zero, r)
    assert_close(v, r / r.norm(dim=1, keepdim=True), 1e-5, "zero J leaves r's direction")


@needs_native
def test_r_in_range_of_j_gives_zero_vector_not_nan():
    jac = torch.randn(2, 10, 3, dtype=torch.float64)
    r = (jac @ torch.randn(2, 3, 1, dtype=torch.float64)).squeeze(2)
    with native_ops():
        v = ops.nullspace_project(jac, r)
    assert torch.isfinite(v).all()
    assert v.norm(dim=1).max() < 1e-6 or torch.allclose(v.norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_empty_batch():
    out = ops.nullspace_project(torch.zeros(0, 10, 2), torch.zeros(0, 10))
    assert out.shape == (0, 10)


@needs_native
def test_opcheck():
    opcheck(torch.ops.fastood.nullspace_project.default, (torch.randn(3, 20, 4), torch.randn(3, 20)))


@needs_native
def test_torch_compile_fullgraph():
    jac, r = torch.randn(3, 20, 4), torch.randn(3, 20)
    with native_ops():
        out = torch.compile(lambda j, x: ops.nullspace_project(j, x) * 2, fullgraph=True, backend="aot_eager")(jac, r)
        want = ops.nullspace_project(jac, r) * 2
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("jac, r, exc, match", [
    (torch.randn(2, 4, 4), torch.randn(2, 4), ValueError, "D > d"),
    (torch.randn(2, 100, 65), torch.randn(2, 100), ValueError, r"d must be in \[1, 64\]"),
    (torch.randn(2, 10, 3), torch.randn(2, 9), ValueError, "r must have shape"),
    (torch.randn(10, 3), torch.randn(10), ValueError, "jac must have 3 dimensions"),
    (torch.randn(2, 10, 3).half(), torch.randn(2, 10).half(), TypeError, "float32, float64"),
    (torch.randn(2, 10, 3), torch.randn(2, 10).double(), TypeError, "same dtype"),
])
def test_bad_inputs(jac, r, exc, match):
    with pytest.raises(exc, match=match):
        ops.nullspace_project(jac, r)


@needs_native
def test_native_checks_name_the_argument():
    with pytest.raises(RuntimeError, match="jac must have D > d"):
        torch.ops.fastood.nullspace_project(torch.randn(2, 3, 3), torch.randn(2, 3))
