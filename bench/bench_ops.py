"""Kernel benchmark: each fused op vs the eager reference vs torch.compile(reference).

    python bench/bench_ops.py [--device cpu|cuda] [--json PATH] [--quick] [--no-compile]

Prints a table (median time, effective GB/s, speedups) and writes the same rows as JSON.
Effective GB/s counts the bytes each op must read and write once (inputs + outputs).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastood.ops as ops  # noqa: E402
from fastood.ops import reference  # noqa: E402

# Peak HBM bandwidth (GB/s) of cards we report against; matched by substring of the device name.
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, min_time=0.3, max_reps=200):
    """Median wall time of ``fn()`` after warm-up; runs until ``min_time`` seconds or ``max_reps`` repetitions."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time or len(times) < 5):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(device, quick):
    """(op name, size label, setup -> (native_fn, reference_fn, bytes)) for each benchmarked configuration."""
    cuda = device.type == "cuda"
    row_sizes = {"small": (256, 10), "large": (65536, 1000) if cuda else (4096, 100)}
    step_sizes = {"small": (16, 1, 28, 28), "large": (4096, 3, 32, 32) if cuda else (256, 3, 32, 32)}
    null_sizes = {"mnist": (256, 784, 8), "cifar": (64, 3072, 32)}
    if quick:
        row_sizes = {"small": (64, 10)}
        step_sizes = {"small": (8, 1, 8, 8)}
        null_sizes = {"mnist": (8, 64, 4)}

    def energy_grad(b, c):
        logits = torch.randn(b, c, device=device) * 3
        return (lambda: ops.modified_energy_grad(logits), lambda: reference.modified_energy_grad(logits),
                4 * (2 * b * c + b))

    def entropy_fwd_bwd(b, c):
        logits = torch.randn(b, c, device=device, requires_grad=True) * 1.0
        logits = logits.detach().requires_grad_()

        def run(fn):
            def go():
                out = fn(logits)
                (g,) = torch.autograd.grad(out.sum(), logits)
                return g
            return go
        return run(ops.softmax_entropy), run(reference.softmax_entropy), 4 * (3 * b * c + 2 * b)

    def langevin(*shape):
        x = torch.rand(shape, device=device) * 2 - 1
        g = torch.randn(shape, device=device)
        n = x.numel()
        return (lambda: ops.langevin_step_(x, g, 0.01, 0.01, -1.0, 1.0),
                lambda: reference.langevin_step_(x, g, 0.01, 0.01, -1.0, 1.0), 4 * 3 * n)

    def nullspace(b, d_out, d):
        jac = torch.randn(b, d_out, d, device=device)
        r = torch.randn(b, d_out, device=device)
        return (lambda: ops.nullspace_project(jac, r), lambda: reference.nullspace_project(jac, r),
                4 * (b * d_out * d + 2 * b * d_out))

    out = []
    for label, (b, c) in row_sizes.items():
        out.append(("modified_energy_grad", f"{b}x{c}", lambda b=b, c=c: energy_grad(b, c)))
        out.append(("softmax_entropy fwd+bwd", f"{b}x{c}", lambda b=b, c=c: entropy_fwd_bwd(b, c)))
    for label, shape in step_sizes.items():
        out.append(("langevin_step_", "x".join(map(str, shape)), lambda shape=shape: langevin(*shape)))
    for label, (b, d_out, d) in null_sizes.items():
        out.append(("nullspace_project", f"B{b} D{d_out} d{d}", lambda b=b, D=d_out, d=d: nullspace(b, D, d)))
    return out


def compiled(fn):
    """torch.compile of a zero-argument closure over the reference op (None if compilation fails)."""
    try:
        cfn = torch.compile(fn, dynamic=False)
        cfn()
        return cfn
    except Exception as exc:  # noqa: BLE001 - a missing compiler must not stop the benchmark
        print(f"  torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", file=sys.stderr)
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    native = ops.native_available() and (device.type == "cpu" or ops.cuda_kernels_available())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None) if device.type == "cuda" else None
    min_time = 0.05 if args.quick else 0.3

    rows = []
    for op_name, size, setup in cases(device, args.quick):
        torch.manual_seed(0)
        native_fn, reference_fn, nbytes = setup()
        t_ref = median_seconds(reference_fn, device, min_time)
        t_native = median_seconds(native_fn, device, min_time) if native else None
        c_fn = None if args.no_compile or args.quick else compiled(reference_fn)
        t_comp = median_seconds(c_fn, device, min_time) if c_fn is not None else None
        row = {
            "op": op_name, "size": size, "device": str(device),
            "native_ms": None if t_native is None else t_native * 1e3,
            "reference_ms": t_ref * 1e3,
            "compiled_ms": None if t_comp is None else t_comp * 1e3,
            "native_gbs": None if t_native is None else nbytes / t_native / 1e9,
            "speedup_vs_reference": None if t_native is None else t_ref / t_native,
            "speedup_vs_compiled": None if (t_native is None or t_comp is None) else t_comp / t_native,
        }
        if peak and row["native_gbs"]:
            row["pct_peak_bandwidth"] = 100.0 * row["native_gbs"] / peak
        rows.append(row)

    def fmt(value, spec):
        return "n/a".rjust(int(spec.split(".")[0])) if value is None else format(value, spec)

    header = f"{'op':26s} {'size':18s} {'native ms':>10s} {'ref ms':>10s} {'compiled ms':>12s} {'GB/s':>8s} {'x ref':>7s} {'x comp':>7s}"
    print(f"fastood bench_ops on {device} ({name}); torch {torch.__version__}; native={native}; "
          f"threads={torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:26s} {r['size']:18s} {fmt(r['native_ms'], '10.4f')} {r['reference_ms']:10.4f} "
              f"{fmt(r['compiled_ms'], '12.4f')} {fmt(r['native_gbs'], '8.2f')} "
              f"{fmt(r['speedup_vs_reference'], '7.2f')} {fmt(r['speedup_vs_compiled'], '7.2f')}")
    if args.json:
        meta = {"device": str(device), "device_name": name, "torch": torch.__version__, "native": native,
                "threads": torch.get_num_threads(), "peak_gbs": peak}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
