"""The CUDA kernels (csrc/cuda/*_kernel.cu, unchanged) run under the SIMT emulation of tests/cuda_emu on the CPU,
against fastood.ops.reference: every kernel, every dtype (packed and unaligned paths), tails and edge cases of
the CPU op tests, under ASan + UBSan and the emulator's misuse checks; and proof that the harness bites:
deliberately mutated copies of the kernels must fail.

Each test batches its cases into one driver process (tests/cuda_emu/runner.py). The driver binary is built
once per tree state and cached under build/cuda_emu (tests/cuda_emu/build.py).
"""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastood.ops import reference
from op_helpers import TOLERANCE, assert_close

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
import build as emu_build  # noqa: E402
from runner import EmulationError, Session  # noqa: E402

HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(shutil.which(emu_build.compiler()) is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def driver():
    return emu_build.build()


def check(got, want, tol, what):
    """assert_close that also allows +-inf, which must then be in the same places with the same sign."""
    got, want = got.double(), want.double()
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    assert_close(got.masked_fill(inf, 0), want.masked_fill(inf, 0), tol, what)


def session(driver, tmp_path, schedule="forward"):
    return Session(driver, str(tmp_path), schedule)


def logits_sample(shape, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------ row kernels

# Rows/cols of the CPU op tests: C = 1, tails of a 16-byte pack, one warp per row (C <= 1024), one block per row
# with the register cache (C <= 8 * 256 * pack) and beyond it.
ROW_SHAPES = [(1, 1), (9, 1), (33, 10), (128, 100), (4, 1000), (3, 2053), (2, 9000)]


def _row_cases(dtype):
    """(name, logits, misaligned) for every shape; the packed path where C allows it plus the unaligned one,
    and a row of NaN, one with +inf and one with -inf."""
    cases = []
    for i, shape in enumerate(ROW_SHAPES):
        x = logits_sample(shape, dtype, 3.0, i)
        cases.append((f"{shape}", x, False))
        if shape[1] > 1:
            cases.append((f"{shape} misaligned", x, True))
    special = logits_sample((3, 64), dtype, 3.0, 99)
    special[0, 5] = float("nan")
    special[1, 7] = float("inf")
    special[2, 9] = float("-inf")
    cases.append(("nan/inf rows", special, False))
    return cases


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_softmax_entropy_kernels(driver, tmp_path, dtype):
    s = session(driver, tmp_path)
    checks = []
    for name, x, misaligned in _row_cases(dtype):
        rows, cols = x.shape
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        g = logits_sample((rows,), torch.float64, 1.0, rows + cols).to(acc)
        xb = s.buffer(x, misalign=misaligned)
        h = s.buffer(numel=rows, dtype=dtype)
        s.call("softmax_entropy", dtype, rows, cols, xb, h, None, None)
        s.save(h, (rows,), name + " entropy")
        grad = s.buffer(numel=rows * cols, dtype=dtype, misalign=misaligned)
        s.call("softmax_entropy", dtype, rows, cols, xb, None, grad, s.buffer(g))
        s.save(grad, (rows, cols), name + " backward")
        checks.append((name + " entropy", reference.softmax_entropy(x.double())))
        checks.append((name + " backward", reference.softmax_entropy_backward(g.double(), x.double())))
    out = s.run()
    for key, want in checks:
        check(out[key], want, TOLERANCE[dtype], f"{dtype} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_entropy_with_grad_kernels(driver, tmp_path, dtype):
    """The forward that keeps dH/df (float32) and its row-scaling backward, as the CPU op has them: the entropy
    in the logits' dtype, dH/df to float32 accuracy against the float64 reference (every shape, packed and
    misaligned -- a misaligned float32 output disables the 32-byte packs of the half types), and the backward =
    grad_entropy[b] * dH/df rounded once to the gradient's dtype."""
    s = session(driver, tmp_path)
    checks, scaled = [], []
    for name, x, misaligned in _row_cases(dtype):
        rows, cols = x.shape
        xb = s.buffer(x, misalign=misaligned)
        h = s.buffer(numel=rows, dtype=dtype)
        d = s.buffer(numel=rows * cols, dtype=torch.float32, misalign=misaligned)
        s.call("softmax_entropy_with_grad", dtype, rows, cols, xb, h, d)
        s.save(h, (rows,), name + " entropy")
        s.save(d, (rows, cols), name + " dentropy")
        ones = torch.ones(rows, dtype=torch.float64)
        checks.append((name + " entropy", reference.softmax_entropy(x.double()), TOLERANCE[dtype]))
        checks.append((name + " dentropy", reference.softmax_entropy_backward(ones, x.double()),
                       TOLERANCE[torch.float32]))
        # the backward from a known float32 dH/df: exactly one multiply and one rounding per value
        dgiven = logits_sample((rows, cols), torch.float32, 1.0, rows * cols)
        g = logits_sample((rows,), torch.float32, 1.0, rows + 7)
        out = s.buffer(numel=rows * cols, dtype=dtype, misalign=misaligned)
        s.call("softmax_entropy_scale_rows", dtype, rows, cols, s.buffer(dgiven, misalign=misaligned), s.buffer(g),
               out)
        s.save(out, (rows, cols), name + " scaled")
        scaled.append((name + " scaled", (g[:, None] * dgiven).to(dtype)))
    out = s.run()
    for key, want, tol in checks:
        check(out[key], want, tol, f"{dtype} {key}")
    for key, want in scaled:
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out[key]), nan), f"{dtype} {key}: NaN pattern"
        assert torch.equal(out[key][~nan], want[~nan]), f"{dtype} {key}: not the one rounding of g * dH/df"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_modified_energy_kernels(driver, tmp_path, dtype):
    s = session(driver, tmp_path)
    checks = []
    for k, (name, x, misaligned) in enumerate(_row_cases(dtype)):
        rows, cols = x.shape
        c = 5.0 if k % 2 == 0 else 2.5
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale = logits_sample((rows,), torch.float64, 1.0, k).to(acc)
        want_e, want_g = reference.modified_energy_grad(x.double(), c)
        xb = s.buffer(x, misalign=misaligned)
        # energy and grad in one launch, energy alone, grad alone (scaled: the backward)
        e, g = s.buffer(numel=rows, dtype=dtype), s.buffer(numel=rows * cols, dtype=dtype, misalign=misaligned)
        s.call("modified_energy", dtype, rows, cols, c, xb, e, g, None)
        s.save(e, (rows,), name + " energy+grad: energy")
        s.save(g, (rows, cols), name + " energy+grad: grad")
        e2 = s.buffer(numel=rows, dtype=dtype)
        s.call("modified_energy", dtype, rows, cols, c, xb, e2, None, None)
        s.save(e2, (rows,), name + " energy")
        g2 = s.buffer(numel=rows * cols, dtype=dtype, misalign=misaligned)
        s.call("modified_energy", dtype, rows, cols, c, xb, None, g2, s.buffer(scale))
        s.save(g2, (rows, cols), name + " backward")
        checks += [(name + " energy+grad: energy", want_e), (name + " energy+grad: grad", want_g),
                   (name + " energy", want_e), (name + " backward", want_g * scale.double()[:, None])]
    out = s.run()
    for key, want in checks:
        check(out[key], want, TOLERANCE[dtype], f"{dtype} {key}")


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-14)])
def test_modified_energy_kernel_exact_for_small_logits(driver, tmp_path, dtype, tol):
    """|f/c| from 1e-7 to 1e-2 (both signs), packed and unaligned: E and dE/df keep every digit (issue 15 item 6:
    1 - exp(s) gave a relative error of 1.4e-3 at s = 1e-5 in float; the kernel uses expm1)."""
    g = torch.Generator().manual_seed(7)
    rows, cols, c = 3, 36, 5.0
    sign = torch.where(torch.rand(rows, cols, generator=g) < 0.5, -1.0, 1.0).double()
    x = (10.0 ** (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 5 - 7) * sign * c).to(dtype)
    s64 = x.double() / c
    want = {"energy": (-s64 * torch.expm1(s64)).sum(1), "grad": (-torch.expm1(s64) - s64 * torch.exp(s64)) / c}
    s = session(driver, tmp_path)
    for misaligned in (False, True):
        xb = s.buffer(x, misalign=misaligned)
        e, gr = s.buffer(numel=rows, dtype=dtype), s.buffer(numel=rows * cols, dtype=dtype, misalign=misaligned)
        s.call("modified_energy", dtype, rows, cols, c, xb, e, gr, None)
        s.save(e, (rows,), f"energy {misaligned}")
        s.save(gr, (rows, cols), f"grad {misaligned}")
    out = s.run()
    for key in [f"{what} {misaligned}" for what in want for misaligned in (False, True)]:
        ref = want[key.split()[0]]
        rel = ((out[key].double() - ref) / ref).abs().max().item()
        assert rel <= tol, f"{dtype} {key}: max relative error {rel:.3e} > {tol:.0e}"


# ------------------------------------------------------------------------------------------------ Langevin step


def langevin_call(s, x, grad, half_step, noise_std, lower, upper, active=None, seed=0, offset=0,
                  channels_last=False, misalign=False):
    """Stages one launch the way csrc/cuda/langevin_step.cpp does; returns the x buffer's name. x and grad are
    logical [B, C, ...] tensors; channels_last: pass them in memory order [B, ..., C]."""
    def memory(t):
        return t.movedim(1, -1).contiguous() if channels_last else t.contiguous()

    lower = torch.as_tensor(lower, dtype=torch.float64).reshape(-1)
    upper = torch.as_tensor(upper, dtype=torch.float64).reshape(-1)
    if lower.numel() != upper.numel():  # as fastood.ops does: both scalar or both per-channel
        lower, upper = lower.expand(x.shape[1]).contiguous(), upper.expand(x.shape[1]).contiguous()
    xb, gb = s.buffer(memory(x), misalign=misalign), s.buffer(memory(grad), misalign=misalign)
    numel = x.numel()
    per_row = numel // x.shape[0]
    channels = x.shape[1]
    ab = s.buffer(active.to(torch.uint8)) if active is not None else None
    s.call("langevin", x.dtype, xb, gb, numel, per_row, per_row // channels, channels, channels_last,
           float(half_step), float(noise_std), s.buffer(lower), s.buffer(upper), lower.numel(), ab, seed, offset)
    return xb


def langevin_result(out, key, x, channels_last):
    t = out[key]
    if channels_last:
        shape = (x.shape[0],) + tuple(x.shape[2:]) + (x.shape[1],)
        return t.reshape(shape).movedim(-1, 1)
    return t.reshape(x.shape)


def _langevin_inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    grad.view(-1)[::7] = 0  # sign(0) = 0
    return x, grad


LANGEVIN_SHAPES = [(1, 1, 1, 1), (4, 3, 5, 5), (2, 10), (3, 2, 7), (2, 300), (3, 1, 9, 4), (2, 3, 2, 3, 4),
                   (1, 2, 513), (5, 3, 16, 16)]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_langevin_step_kernel_without_noise(driver, tmp_path, dtype):
    """Exact (half types: one rounding) against the reference: shapes with tails, per-channel bounds, the
    active mask, unaligned (scalar) accesses and channels_last memory, NaN/inf handling."""
    s = session(driver, tmp_path)
    checks = []
    for i, shape in enumerate(LANGEVIN_SHAPES):
        x, grad = _langevin_inputs(shape, dtype, i)
        c = shape[1]
        variants = [("scalar bounds", -0.6, 0.7, None, False, False),
                    ("per-channel bounds", [-0.5 + 0.1 * k for k in range(c)], [0.2 + 0.1 * k for k in range(c)],
                     None, False, True)]
        if shape[0] > 1:
            active = torch.arange(shape[0]) % 2 == 0
            variants.append(("active mask", -0.6, 0.7, active, False, False))
        if len(shape) >= 3:
            variants.append(("channels_last", [-0.5 + 0.1 * k for k in range(c)], 0.6, None, True, False))
            variants.append(("channels_last active", -0.6, 0.7, torch.arange(shape[0]) % 3 != 1, True, True))
        for name, lo, hi, active, cl, misalign in variants:
            xx = x.clone()
            if i == 1:
                xx[0, 0, 0, 0] = float("nan")
                xx[1, 1, 1, 1] = float("inf")
                grad[2, 2, 2, 2] = float("nan")
            key = f"{shape} {name}"
            xb = langevin_call(s, xx, grad, 0.1, 0.0, lo, hi, active, channels_last=cl, misalign=misalign)
            s.save(xb, (xx.numel(),), key)
            want = xx.clone()
            hi_ref = hi if not isinstance(hi, float) else [hi] * c
            lo_ref = lo if not isinstance(lo, float) else [lo] * c
            reference.langevin_step_(want, grad, 0.2, 0.0, torch.tensor(lo_ref, dtype=torch.float64),
                                     torch.tensor(hi_ref, dtype=torch.float64), active)
            checks.append((key, xx, cl, want))
    out = s.run()
    for key, x, cl, want in checks:
        got = langevin_result(out, key, x, cl)
        tol = TOLERANCE[dtype] if dtype in HALF else 0.0
        check(got, want, tol, f"{dtype} {key}")


# Philox4x32-10 and curand's layout, written independently of the kernels, in numpy: the specification of the
# noise a GPU draws (torch's CUDA generator + curand_init(seed, thread, offset) + curand_normal4).
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    c = [np.asarray(v, dtype=np.uint64) & _M32 for v in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0) & _M32, np.uint64(k1) & _M32
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & _M32, p1 & _M32, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & _M32,
             p0 & _M32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & _M32, (k1 + np.uint64(0xBB67AE85)) & _M32
    return c


def test_philox_reference_known_answers():
    # Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter 0 / key 0 and all-ones.
    assert [int(v) for v in philox4x32_10(0, 0, 0, 0, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert [int(v) for v in philox4x32_10(ones, ones, ones, ones, ones, ones)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def curand_layout_noise(numel, seed, offset):
    """Normals z[e] the CUDA Langevin kernel draws: thread t (of S = blocks * 256) owns groups g = t + k S of four
    elements and draws them with the k-th curand_normal4 of curand_init(seed, t, offset)."""
    blocks = min(max(-(-numel // 1024), 1), 1024)
    threads = blocks * 256
    groups = np.arange(-(-numel // 4), dtype=np.uint64)
    t, k = groups % np.uint64(threads), groups // np.uint64(threads)
    lo = np.uint64(offset // 4) + k
    x0, x1, x2, x3 = philox4x32_10(lo & _M32, lo >> np.uint64(32), t & _M32, t >> np.uint64(32), seed & 0xFFFFFFFF,
                                   seed >> 32)
    inv = np.float32(2.3283064e-10)
    inv2pi = np.float32(2.3283064e-10) * np.float32(6.2831855)

    def box_muller(a, b):
        u = a.astype(np.float32) * inv + inv / np.float32(2)
        v = b.astype(np.float32) * inv2pi + inv2pi / np.float32(2)
        s = np.sqrt(-2.0 * np.log(u.astype(np.float64)))
        return np.sin(v.astype(np.float64)) * s, np.cos(v.astype(np.float64)) * s

    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return torch.from_numpy(np.stack([z0, z1, z2, z3], 1).reshape(-1)[:numel].copy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_langevin_noise_is_curands_philox_stream(driver, tmp_path, dtype):
    """Pure noise (x = 0, zero gradient, wide bounds) equals the curand-layout Philox normals of the seed and
    offset, for a single group, a tail, several grid-stride iterations, and channels_last memory (noise keyed by
    the logical index). Also checks the Philox offset increment the host reserves."""
    s = session(driver, tmp_path)
    cases = []
    for shape, seed, offset, cl in [((1, 3), 7, 0, False), ((2, 3, 5, 7), 123456789012345, 8, False),
                                    ((1, 2, 524289), 42, 4, False), ((2, 3, 5, 7), 5, 12, True)]:
        x = torch.zeros(shape, dtype=dtype)
        key = f"{shape} seed {seed} offset {offset} cl {cl}"
        xb = langevin_call(s, x, x, 0.0, 1.0, -100.0, 100.0, seed=seed, offset=offset, channels_last=cl)
        s.save(xb, (x.numel(),), key)
        cases.append((key, x, cl, seed, offset))
    for numel in (1, 1025, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 1):
        s.call("philox_increment", numel)
    out = s.run()
    for key, x, cl, seed, offset in cases:
        got = langevin_result(out, key, x, cl).reshape(-1).double()
        want = curand_layout_noise(x.numel(), seed, offset)
        # Uniforms are bit-exact; the device's __sincosf differs from sinf/cosf in the last bits.
        assert (got - want).abs().max().item() < 2e-5, key
    increments = [int(v) for v in out["stdout"].split()]
    # One curand_normal4 (4 counter units) per grid-stride iteration of a thread: grid 1024 x 256 x 4 elements.
    assert increments == [4, 4, 4, 8, 16]


# ------------------------------------------------------------------------------------------- null-space projection


def qr_reference64(jac, r):
    q, _ = torch.linalg.qr(jac.double(), mode="reduced")
    p = r.double() - (q @ (q.transpose(1, 2) @ r.double().unsqueeze(2))).squeeze(2)
    n = p.norm(dim=1, keepdim=True)
    return torch.where(n > 0, p / n, torch.zeros_like(p))


def nullspace_call(s, jac, r, key):
    out = s.buffer(numel=r.numel(), dtype=r.dtype)
    s.call("nullspace", jac.dtype, s.buffer(jac), s.buffer(r), out, *jac.shape)
    s.save(out, r.shape, key)


NULLSPACE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nullspace_project_kernel(driver, tmp_path, dtype):
    """Shapes of the CPU tests (d = 1 .. 64, a tile boundary, long D), rank deficiency, extreme scales and NaN/Inf
    samples, against float64 QR."""
    s = session(driver, tmp_path)
    g = torch.Generator().manual_seed(0)
    checks = []
    for shape in [(1, 2, 1), (5, 50, 4), (4, 37, 13), (2, 784, 8), (2, 300, 64), (2, 120, 33), (1, 5000, 8),
                  (1, 200, 32), (1, 100, 16)]:
        jac = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        r = torch.randn(shape[:2], generator=g, dtype=torch.float64).to(dtype)
        nullspace_call(s, jac, r, f"{shape}")
        checks.append((f"{shape}", qr_reference64(jac, r), NULLSPACE_TOL[dtype]))
    col = torch.randn(3, 40, 1, generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(3, 40, generator=g, dtype=torch.float64).to(dtype)
    for name, jac in [("duplicate columns", torch.cat([col, col, 2 * col], 2)), ("zero J", torch.zeros(3, 40, 3, dtype=dtype))]:
        nullspace_call(s, jac, r, name)
        want = qr_reference64(col, r) if name != "zero J" else r.double() / r.double().norm(dim=1, keepdim=True)
        checks.append((name, want, 1e-6))
    rz = torch.zeros(3, 10, dtype=dtype)
    jz = torch.randn(3, 10, 3, generator=g, dtype=torch.float64).to(dtype)
    nullspace_call(s, jz, rz, "r = 0")
    checks.append(("r = 0", torch.zeros(3, 10, dtype=torch.float64), 0.0))
    jn = torch.randn(4, 20, 3, generator=g, dtype=torch.float64).to(dtype)
    rn = torch.randn(4, 20, generator=g, dtype=torch.float64).to(dtype)
    jn[0, 5, 1] = float("nan")
    rn[1, 7] = float("inf")
    jn[2, 0, 0] = float("-inf")
    nullspace_call(s, jn, rn, "nan/inf")
    want = qr_reference64(jn, rn)
    want[:3] = float("nan")
    checks.append(("nan/inf", want, NULLSPACE_TOL[dtype]))
    if dtype == torch.float64:
        jac = torch.randn(3, 50, 4, generator=g, dtype=torch.float64)
        r = torch.randn(3, 50, generator=g, dtype=torch.float64)
        for sj, sr in [(1e200, 1.0), (1e-200, 1.0), (1.0, 1e250), (1.0, 1e-250), (1e-160, 1e160), (1e150, 1e-300)]:
            nullspace_call(s, jac * sj, r * sr, f"scales {sj} {sr}")
            checks.append((f"scales {sj} {sr}", qr_reference64(jac, r), 1e-12))
    out = s.run()
    for key, want, tol in checks:
        assert_close(out[key], want, tol, f"{dtype} {key}")


def test_nullspace_project_kernel_extreme_inputs(driver, tmp_path):
    """Section 2 of issue 13: finite values near the top of float64 are not NaN; subnormal max|J| or max|r| are
    rescaled (2^-ilogb(m) would overflow); tiny float32 r gives the unit direction."""
    s = session(driver, tmp_path)
    checks = []
    e1 = torch.zeros(1, 3, 1, dtype=torch.float32)
    e1[0, 0, 0] = 1
    nullspace_call(s, e1, torch.tensor([[0.0, 1e-40, 1e-40]]), "tiny float32 r")
    checks.append(("tiny float32 r", torch.tensor([[0.0, 0.5 ** 0.5, 0.5 ** 0.5]], dtype=torch.float64), 1e-6))
    g = torch.Generator().manual_seed(3)
    jac = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    r = torch.randn(2, 30, generator=g, dtype=torch.float64)
    for name, sj, sr in [("subnormal J", 1e-310, 1.0), ("subnormal r", 1.0, 1e-315), ("both subnormal", 1e-312, 1e-320),
                         ("J near DBL_MAX", 1e307, 1.0), ("r near DBL_MAX", 1.0, 1e307)]:
        jj, rr = jac * sj, r * sr
        if name == "J near DBL_MAX":
            jj = jac / jac.abs().amax(dim=(1, 2), keepdim=True) * 1.797e308  # finite, above 1.79e308
        if name == "r near DBL_MAX":
            rr = r / r.abs().amax(dim=1, keepdim=True) * 1.795e308
        assert torch.isfinite(jj).all() and torch.isfinite(rr).all()
        nullspace_call(s, jj, rr, name)
        checks.append((name, qr_reference64(jj / jj.abs().amax(), rr / rr.abs().amax()), 1e-9))
    out = s.run()
    for key, want, tol in checks:
        assert_close(out[key], want, tol, key)


# --------------------------------------------------------------------------------------------- schedule variants


@pytest.mark.parametrize("schedule", ["reverse", "random:7"])
def test_results_do_not_depend_on_the_thread_schedule(driver, tmp_path, schedule):
    """Threads between two barriers run in another order: a missing barrier would change the results."""
    outs = []
    for sched in ("forward", schedule):
        s = session(driver, tmp_path / sched.replace(":", ""), sched)
        x = logits_sample((3, 2053), torch.float32, 3.0, 0)  # one block per row: block reductions
        h = s.buffer(numel=3, dtype=torch.float32)
        s.call("softmax_entropy", torch.float32, 3, 2053, s.buffer(x), h, None, None)
        s.save(h, (3,), "h")
        for d in (4, 40):  # d = 4: groups of threads share the rows of a tile
            jac = logits_sample((2, 300, d), torch.float64, 1.0, d)
            nullspace_call(s, jac, logits_sample((2, 300), torch.float64, 1.0, 2), f"p{d}")
        outs.append(s.run())
    for key in ("h", "p4", "p40"):
        assert torch.equal(outs[0][key], outs[1][key]), key


# ----------------------------------------------------------------------------------------- the harness bites

# (name, kernel file, original text, mutated text, the test that must now fail, what its failure must say)
MUTATIONS = [
    ("off-by-one row index", "softmax_entropy_kernel.cu", "reinterpret_cast<const PackT*>(logits + row * cols)",
     "reinterpret_cast<const PackT*>(logits + (row + 1) * cols)", "softmax_entropy",
     r"heap-buffer-overflow|max error|NaN positions"),
    ("wrong shuffle width", "nullspace_project_kernel.cu", "__shfl_xor_sync(0xffffffffu, v, offset)",
     "__shfl_xor_sync(0xffffffffu, v, offset, 16)", "nullspace", r"max error|NaN positions"),
    ("divergent __syncthreads", "nullspace_project_kernel.cu", "  __syncthreads();  // scratch is free",
     "  if (threadIdx.x < 128) __syncthreads();", "nullspace", r"divergent __syncthreads"),
    ("missing __syncthreads", "nullspace_project_kernel.cu", "  __syncthreads();\n  double total = scratch[0];",
     "  double total = scratch[0];", "nullspace", r"max error|NaN positions|divergent __syncthreads"),
    ("shuffle mask names an exited lane", "modified_energy_kernel.cu",
     "  const int lane = threadIdx.x % kThreadsPerRow;\n",
     "  const int lane = threadIdx.x % kThreadsPerRow;\n  if (lane >= 16) return;\n", "modified_energy",
     r"names lane 16; but thread \d+ has exited"),
    ("kept gradient not divided by S", "softmax_entropy_kernel.cu",
     "(kMode == kBackward ? grad_entropy[row] : A(1)) / sum", "(kMode == kBackward ? grad_entropy[row] / sum : A(1))",
     "softmax_entropy_with_grad", r"max error"),
    ("off-by-one active row", "langevin_step_kernel.cu", "!active[c.row]", "!active[c.row + 1]", "langevin",
     r"heap-buffer-overflow"),
    ("out-of-bounds shared store", "nullspace_project_kernel.cu", "  if (lane == 0) scratch[warp] = v;",
     "  if (lane == 0) scratch[warp + 1] = v;", "nullspace", r"global-buffer-overflow|insufficient space"),
    ("endless loop (watchdog)", "langevin_step_kernel.cu", "base < numel; base += stride)",
     "base < numel; base += 0 * stride)", "langevin", r"watchdog"),
]

PROBES = {
    "softmax_entropy": lambda drv, tmp: test_softmax_entropy_kernels(drv, tmp, torch.float32),
    "softmax_entropy_with_grad": lambda drv, tmp: test_softmax_entropy_with_grad_kernels(drv, tmp, torch.float32),
    "modified_energy": lambda drv, tmp: test_modified_energy_kernels(drv, tmp, torch.float32),
    "langevin": lambda drv, tmp: test_langevin_step_kernel_without_noise(drv, tmp, torch.float32),
    "nullspace": lambda drv, tmp: test_nullspace_project_kernel(drv, tmp, torch.float64),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutated_kernel_fails(tmp_path, monkeypatch, mutation):
    """A copy of csrc/cuda with one deliberate bug must fail the emulated tests with the expected diagnosis
    (only the mutated translation unit is recompiled; the others come from the cache)."""
    name, filename, original, mutated, probe, expected = mutation
    monkeypatch.setenv("FASTOOD_EMU_WATCHDOG_S", "10")  # per launch; the probes' launches take well under 1 s
    src = tmp_path / "src" / "cuda"
    shutil.copytree(emu_build.CUDA_SRC, src)
    path = src / filename
    text = path.read_text()
    assert text.count(original) == 1, f"mutation {name!r}: {original!r} must occur once in {filename}"
    path.write_text(text.replace(original, mutated))
    mutant = emu_build.build(src_root=str(src))
    with pytest.raises((AssertionError, EmulationError)) as failure:
        PROBES[probe](mutant, tmp_path / "run")
    assert re.search(expected, str(failure.value)), f"{name}: unexpected failure:\n{str(failure.value)[:3000]}"


# ------------------------------------------------------------------------------------------------ make gpu-check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_says_no_gpu_visible(tmp_path):
    """Dry run of scripts/gpu_check.sh with no GPU visible: a clear message, exit status 2, nothing built or
    written (on a GPU machine too: CUDA_VISIBLE_DEVICES hides the devices from torch)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu-check: no GPU visible" in proc.stderr
    assert not out.exists()


def test_gpu_check_report_writes_one_json_and_one_table(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "steps.tsv").write_text("build\tpassed\t0\t81.5\tpython setup.py build_ext\n"
                                        "cuda-tests\tfailed\t1\t12.0\tpytest\n"
                                        "cuda-tests-x\tskipped\t-\t0\tpytest is not installed\n"
                                        "bench-ops\ttimeout\t124\t60.0\tbench_ops\n")
    (tmp_path / "logs" / "cuda-tests.log").write_text("...\n1 failed, 40 passed in 12.0s\n")
    (tmp_path / "logs" / "bench-ops.log").write_text("op | ms\nsoftmax | 0.01\n")
    (tmp_path / "bench-ops.json").write_text('{"rows": [{"op": "softmax", "ms": 0.01}]}')
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check_report.py"), str(tmp_path),
                    "--gpu", "Test GPU", "--arch", "9.0", "--seconds", "200"], check=True, capture_output=True)
    import json

    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["ok"] is False
    assert [s["status"] for s in report["steps"]] == ["passed", "failed", "skipped", "timeout"]
    assert report["steps"][1]["log_tail"][-1] == "1 failed, 40 passed in 12.0s"
    assert report["benchmarks"]["bench-ops"]["rows"][0]["op"] == "softmax"
    table = (tmp_path / "gpu-check.md").read_text()
    assert "SOME STEPS DID NOT PASS" in table and "| cuda-tests | failed | 1 | 12.0 | 1 failed, 40 passed" in table
    assert "softmax | 0.01" in table
