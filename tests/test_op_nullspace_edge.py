"""nullspace_project at the edges of the floating-point range (issue 13, section 2): subnormal max|J| or max|r|
(the power-of-two rescale used to form 2^-ilogb(m), which overflows), a tiny float32 r (used to give NaN/Inf),
and finite values near DBL_MAX (must not be taken for Inf)."""
import math

import pytest
import torch

import fastood.ops as ops

from op_helpers import DEVICES, needs_native

pytestmark = needs_native
HALF = 1 / math.sqrt(2)


def _project(jac, r, device):
    with ops.use_backend("native"):
        return ops.nullspace_project(jac.to(device), r.to(device)).cpu()


def _e1(dtype, scale=1.0):
    jac = torch.zeros(1, 3, 1, dtype=dtype)
    jac[0, 0, 0] = scale
    return jac


CASES = [
    # (name, dtype, J scale, r): with J = scale * e1, P r / |P r| = [0, r1, r2] / |[r1, r2]|.
    ("float32 tiny r", torch.float32, 1.0, [0.0, 1e-40, 1e-40]),
    ("float32 tiny r, J = 0.5", torch.float32, 0.5, [3e-42, 1e-40, 1e-40]),
    ("float32 tiny r and J", torch.float32, 1e-41, [0.0, 2e-40, 2e-40]),
    ("float64 subnormal r", torch.float64, 1.0, [0.0, 1e-310, 1e-310]),
    ("float64 subnormal J", torch.float64, 1e-310, [1.0, 1.0, 1.0]),
    ("float64 subnormal J and r", torch.float64, 4e-320, [1e-312, 3e-311, 3e-311]),
    ("float64 near DBL_MAX", torch.float64, 1.7976931348623157e308, [1.7e308, 1.7e308, 1.7e308]),
    ("float32 near FLT_MAX", torch.float32, 3.4e38, [3.4e38, 3.4e38, 3.4e38]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype,scale,r", CASES, ids=[c[0] for c in CASES])
def test_projection_is_finite_and_unit_at_range_edges(device, name, dtype, scale, r):
    r = torch.tensor([r], dtype=dtype)
    got = _project(_e1(dtype, scale), r, device)
    assert torch.isfinite(got).all(), f"{name}: {got}"
    want = torch.tensor([[0.0, HALF, HALF]], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0, msg=f"{name}: {got}")


@pytest.mark.parametrize("device", DEVICES)
def test_rescaled_sample_keeps_its_neighbours_unscaled(device):
    """A batch mixing a subnormal sample with ordinary ones: each sample is scaled on its own."""
    jac = torch.cat([_e1(torch.float64, 1e-310), _e1(torch.float64, 1.0), _e1(torch.float64, 3.0)])
    r = torch.tensor([[1.0, 1.0, 1.0], [5.0, 3.0, 4.0], [1.0, 0.0, -2.0]], dtype=torch.float64)
    got = _project(jac, r, device)
    want = torch.tensor([[0.0, HALF, HALF], [0.0, 0.6, 0.8], [0.0, 0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_inputs_still_give_nan_rows(device):
    jac = torch.cat([_e1(torch.float64), _e1(torch.float64)])
    r = torch.tensor([[0.0, 1.0, float("inf")], [0.0, 1.0, 1.0]], dtype=torch.float64)
    got = _project(jac, r, device)
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()
