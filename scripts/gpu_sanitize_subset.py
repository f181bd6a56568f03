"""A short run of every fastood CUDA kernel path, for compute-sanitizer (scripts/gpu_check.sh).

    compute-sanitizer --tool memcheck python scripts/gpu_sanitize_subset.py

Each op once per path: row kernels in every dtype, packed (16-byte aligned, C a multiple of the pack) and
unaligned, one warp per row and one block per row; the Langevin step with and without noise, per-channel bounds,
the active mask and channels_last x; the null-space projection for d = 1, 16, 33, 64, a rescaled sample and a
NaN sample. Sizes are small: under the sanitizer every launch is slow. Results are compared with the reference
loosely (the exact checks are tests/test_op_*.py), so a kernel that ran but wrote garbage fails here too.
Exit status 0 when every check passed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastood.ops as ops  # noqa: E402
from fastood.ops import reference  # noqa: E402

TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1.5e-1}


def close(got, want, tol, what):
    got, want = got.double().cpu(), want.double().cpu()
    same_nan = torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    err = ((got[finite] - want[finite]).abs() / want[finite].abs().clamp_min(1)).max().item() if finite.any() else 0
    ok = same_nan and err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {what}: max rel error {err:.2e}", flush=True)
    return ok


def unaligned(t):
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def main():
    if not torch.cuda.is_available():
        raise SystemExit("gpu_sanitize_subset: no CUDA device")
    if not ops.cuda_kernels_available():
        raise SystemExit("gpu_sanitize_subset: fastood was built without CUDA kernels (FASTOOD_CUDA=1 build first)")
    dev = "cuda"
    ok = True
    torch.manual_seed(0)
    with ops.use_backend("native"):
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for rows, cols in ((33, 64), (5, 10), (2, 3000)):
                x = (torch.randn(rows, cols, dtype=torch.float64) * 3).to(dev, dtype)
                for name, xx in (("aligned", x), ("unaligned", unaligned(x))):
                    what = f"{dtype} {rows}x{cols} {name}"
                    ok &= close(ops.softmax_entropy(xx), reference.softmax_entropy(xx.double()), TOL[dtype],
                                "softmax_entropy " + what)
                    e, g = ops.modified_energy_grad(xx, 5.0)
                    we, wg = reference.modified_energy_grad(xx.double(), 5.0)
                    ok &= close(e, we, TOL[dtype], "modified_energy " + what)
                    ok &= close(g, wg, TOL[dtype], "modified_energy grad " + what)
                    gh = torch.randn(rows, device=dev, dtype=dtype)
                    bw = torch.ops.fastood.softmax_entropy_backward(gh, xx)
                    ok &= close(bw, reference.softmax_entropy_backward(gh.double(), xx.double()), TOL[dtype],
                                "softmax_entropy_backward " + what)
            x = torch.rand(6, 3, 9, 7, device=dev, dtype=torch.float64).to(dtype) * 2 - 1
            grad = torch.randn_like(x)
            active = torch.tensor([True, False, True, True, False, True], device=dev)
            for name, xx, kwargs in (("plain", x.clone(), {}),
                                     ("per-channel + active", x.clone(), dict(active=active)),
                                     ("channels_last", x.clone().to(memory_format=torch.channels_last), {})):
                lo = [-0.5, -0.4, -0.3] if kwargs else -0.5
                want = x.clone()
                reference.langevin_step_(want, grad, 0.2, 0.0, lo, 0.6, kwargs.get("active"))
                ops.langevin_step_(xx, grad, 0.2, 0.0, lo, 0.6, **kwargs)
                ok &= close(xx, want, TOL[dtype], f"langevin_step_ {dtype} {name}")
            noisy = x.clone()
            ops.langevin_step_(noisy, grad, 0.2, 0.3, -5.0, 5.0)
            ok &= bool(torch.isfinite(noisy).all())
        for dtype in (torch.float32, torch.float64):
            for b, dd, d in ((3, 40, 1), (2, 200, 16), (2, 150, 33), (1, 300, 64)):
                jac = torch.randn(b, dd, d, device=dev, dtype=dtype)
                r = torch.randn(b, dd, device=dev, dtype=dtype)
                ok &= close(ops.nullspace_project(jac, r), reference.nullspace_project(jac.double(), r.double()),
                            TOL[dtype] * 10, f"nullspace_project {dtype} {b}x{dd}x{d}")
        jac0 = torch.randn(3, 50, 4, device=dev, dtype=torch.float64)
        r0 = torch.randn(3, 50, device=dev, dtype=torch.float64)
        jac, r = jac0.clone(), r0.clone()
        jac[0] *= 1e200  # the projection does not depend on the scale of J or r
        r[1] *= 1e-310
        jac[2, 0, 0] = float("nan")
        want = reference.nullspace_project(jac0, r0)
        want[2] = float("nan")
        ok &= close(ops.nullspace_project(jac, r), want, 1e-8, "nullspace_project rescaled / subnormal / NaN")
    torch.cuda.synchronize()
    print("gpu_sanitize_subset:", "all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
