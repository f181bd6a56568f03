"""Kernel benchmark: each fused op vs the eager reference vs torch.compile(reference), float32 and bfloat16.

    python bench/bench_ops.py [--device cpu|cuda] [--json PATH] [--quick] [--no-compile]
                              [--dtypes fp32 bf16] [--all-capabilities] [--threads N] [--min-time S]
                              [--stat median|min] [--ops NAME ...]

Prints a table and writes the same rows as JSON. Per row: median times of the native op, the eager reference
and torch.compile(reference), timed round-robin in the same run (so that load from other processes hits all of
them alike: on a shared machine compare the ratios, not the absolute times); the work done -- bytes each op must
read and write once (inputs + outputs) and the floating-point operations its kernel performs (counted from the
kernel's arithmetic, FLOPS_PER_ELEMENT) -- and the achieved fraction of the machine's peak
(_common.machine_peak: on CPU the FMA throughput of the capability's vectors measured by a native probe -- the
measured GEMM rate and the nominal cores x FMA width x clock are printed next to it --, on GPU the card's
published FLOP/s and bandwidth).

``--all-capabilities`` (CPU): one native column per instruction set this CPU supports (default, avx2, avx512),
timed in the same rounds; the CPU kernels otherwise run with the best one (or $FASTOOD_CPU_CAPABILITY).
nullspace_project has no bfloat16 kernel and is benchmarked in float32 only.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import statistics  # noqa: E402

from _common import (cpu_capability, environment, format_table, interleaved_times,  # noqa: E402
                     machine_peak, percent, write_json)

import fastood.ops as ops  # noqa: E402
from fastood.ops import reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Floating-point operations per element of the kernels (an FMA counts 2), counted from csrc/cpu/kernels/:
# exp ~22 (range reduction 7, degree-5 polynomial 12, scale 3); modified energy + gradient: s, exp, energy
# term 3, gradient 4; softmax entropy forward: max, z, exp, S, T (25) and backward: on CUDA the same again plus 3,
# on CPU (where the forward keeps dH/df for the backward: fastood::softmax_entropy_with_grad) 3 in the forward
# and 1 in the backward;
# Langevin step: sign step, noise FMA, two clamps (5) plus Box-Muller (log ~20, sqrt, sincos ~25 per pair).
FLOPS_PER_ELEMENT = {"modified_energy_grad": 30, "softmax_entropy fwd+bwd": 53, "softmax_entropy fwd+bwd cpu": 29,
                     "langevin_step_": 29}


def nullspace_flops(b, d_out, d):
    """J^T J (2 D d^2), J^T r (2 D d), Cholesky solve (d^3/3 + 2 d^2), P r = r - J a (2 D d), norm (2 D)."""
    return b * (2 * d_out * d * d + 4 * d_out * d + d ** 3 / 3 + 2 * d * d + 2 * d_out)


def cases(device, quick, dtype):
    """(op name, size label, setup -> (native_fn, reference_fn, bytes, flops)) for each configuration."""
    cuda = device.type == "cuda"
    size = torch.tensor([], dtype=dtype).element_size()
    row_sizes = {"small": (256, 10), "large": (65536, 1000) if cuda else (4096, 100)}
    step_sizes = {"small": (16, 1, 28, 28), "large": (4096, 3, 32, 32) if cuda else (256, 3, 32, 32)}
    null_sizes = {"mnist": (256, 784, 8), "cifar": (64, 3072, 32)}
    if quick:
        row_sizes = {"small": (64, 10)}
        step_sizes = {"small": (8, 1, 8, 8)}
        null_sizes = {"mnist": (8, 64, 4)}

    def energy_grad(b, c):
        logits = (torch.randn(b, c, device=device) * 3).to(dtype)
        return (lambda: ops.modified_energy_grad(logits), lambda: reference.modified_energy_grad(logits),
                size * (2 * b * c + b), FLOPS_PER_ELEMENT["modified_energy_grad"] * b * c)

    def entropy_fwd_bwd(b, c):
        logits = torch.randn(b, c, device=device).to(dtype).requires_grad_()

        def run(fn):
            def go():
                out = fn(logits)
                (g,) = torch.autograd.grad(out.sum(), logits)
                return g
            return go
        if cuda:  # forward reads f, writes H; backward reads f and dH, writes df
            moved, flops = size * (3 * b * c + 2 * b), FLOPS_PER_ELEMENT["softmax_entropy fwd+bwd"] * b * c
        else:  # forward reads f, writes H and dH/df (float32); backward reads dH/df and dH, writes df
            moved = size * (2 * b * c + 2 * b) + 4 * 2 * b * c
            flops = FLOPS_PER_ELEMENT["softmax_entropy fwd+bwd cpu"] * b * c
        return (run(ops.softmax_entropy), run(reference.softmax_entropy), moved, flops)

    def langevin(*shape):
        x = (torch.rand(shape, device=device) * 2 - 1).to(dtype)
        g = torch.randn(shape, device=device).to(dtype)
        n = x.numel()
        return (lambda: ops.langevin_step_(x, g, 0.01, 0.01, -1.0, 1.0),
                lambda: reference.langevin_step_(x, g, 0.01, 0.01, -1.0, 1.0), size * 3 * n,
                FLOPS_PER_ELEMENT["langevin_step_"] * n)

    def nullspace(b, d_out, d):
        jac = torch.randn(b, d_out, d, device=device)
        r = torch.randn(b, d_out, device=device)
        return (lambda: ops.nullspace_project(jac, r), lambda: reference.nullspace_project(jac, r),
                4 * (b * d_out * d + 2 * b * d_out), nullspace_flops(b, d_out, d))

    out = []
    for label, (b, c) in row_sizes.items():
        out.append(("modified_energy_grad", f"{b}x{c}", lambda b=b, c=c: energy_grad(b, c)))
        out.append(("softmax_entropy fwd+bwd", f"{b}x{c}", lambda b=b, c=c: entropy_fwd_bwd(b, c)))
    for label, shape in step_sizes.items():
        out.append(("langevin_step_", "x".join(map(str, shape)), lambda shape=shape: langevin(*shape)))
    if dtype == torch.float32:
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


def with_capability(fn, name):
    """fn run with the CPU kernels of capability ``name``."""
    def run():
        torch.ops.fastood.set_cpu_capability(name)
        return fn()
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (smoke test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="dtypes of the rows (default: %(default)s)")
    parser.add_argument("--all-capabilities", action="store_true",
                        help="CPU: time the native ops once per instruction set this CPU supports")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; on a machine shared with other jobs, 1 "
                             "keeps a descheduled worker thread from stalling every parallel call)")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic of the round-robin samples (min: the least disturbed call, for a machine "
                             "shared with other jobs; default: %(default)s)")
    parser.add_argument("--ops", nargs="+", choices=["modified_energy_grad", "softmax_entropy", "langevin_step_",
                                                     "nullspace_project"], help="only these ops")
    parser.add_argument("--min-time", type=float, default=None,
                        help="seconds of round-robin timing per row (default 0.5, --quick 0.02)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    native = ops.native_available() and (device.type == "cpu" or ops.cuda_kernels_available())
    capability = cpu_capability() if native and device.type == "cpu" else None
    capabilities = [capability] if capability else []
    if args.all_capabilities and capability:
        capabilities = list(torch.ops.fastood.cpu_capabilities_supported())
    min_time = args.min_time if args.min_time is not None else (0.02 if args.quick else 0.5)

    rows, peaks = [], {}
    try:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            peak = peaks.setdefault(dtype_name, machine_peak(device, dtype, capability))
            for op_name, size, setup in cases(device, args.quick, dtype):
                if args.ops and op_name.split()[0] not in args.ops:
                    continue
                torch.manual_seed(0)
                native_fn, reference_fn, nbytes, flops = setup()
                fns = {"reference": reference_fn}
                if native and device.type == "cpu":
                    fns.update({f"native[{cap}]": with_capability(native_fn, cap) for cap in capabilities})
                elif native:
                    fns["native"] = native_fn
                c_fn = None if args.no_compile or args.quick else compiled(reference_fn)
                if c_fn is not None:
                    fns["compiled"] = c_fn
                times = interleaved_times(fns, device, repeats=5, min_time=min_time, max_rounds=2000)
                pick = min if args.stat == "min" else statistics.median
                t = {name: pick(ts) for name, ts in times.items()}
                t_native = t.get(f"native[{capability}]", t.get("native"))
                t_ref, t_comp = t["reference"], t.get("compiled")
                row = {
                    "op": op_name, "size": size, "dtype": dtype_name, "device": str(device),
                    "cpu_capability": capability,
                    "native_ms": None if t_native is None else t_native * 1e3,
                    "reference_ms": t_ref * 1e3,
                    "compiled_ms": None if t_comp is None else t_comp * 1e3,
                    "bytes": nbytes, "flops": flops,
                    "native_gbs": None if t_native is None else nbytes / t_native / 1e9,
                    "native_gflops": None if t_native is None else flops / t_native / 1e9,
                    "speedup_vs_reference": None if t_native is None else t_ref / t_native,
                    "speedup_vs_compiled": None if (t_native is None or t_comp is None) else t_comp / t_native,
                }
                row["pct_peak_flops"] = percent(row["native_gflops"] and row["native_gflops"] * 1e9, peak["flops"])
                row["pct_peak_bandwidth"] = percent(row["native_gbs"], peak["gbs"])
                if len(capabilities) > 1:
                    row["native_ms_by_capability"] = {cap: t[f"native[{cap}]"] * 1e3 for cap in capabilities}
                    row["speedup_vs_reference_by_capability"] = {cap: t_ref / t[f"native[{cap}]"]
                                                                 for cap in capabilities}
                    if t_comp is not None:
                        row["speedup_vs_compiled_by_capability"] = {cap: t_comp / t[f"native[{cap}]"]
                                                                    for cap in capabilities}
                rows.append(row)
    finally:
        if capability:
            torch.ops.fastood.set_cpu_capability(capability)

    meta = environment(device, cpu_capability=capability, capabilities_timed=capabilities, min_time=min_time,
                       statistic=args.stat,
                       peaks=peaks, flops_per_element=FLOPS_PER_ELEMENT)
    print(f"fastood bench_ops on {device} ({meta['device_name']}); torch {torch.__version__}; native={native}; "
          f"cpu capability={capability}; threads={torch.get_num_threads()}")
    print(f"times: {args.stat} of round-robin rounds in this run (on a loaded machine compare the ratios)")
    for name, peak in peaks.items():
        print(f"peak ({name}): {peak['basis']}")
    columns = [("op", "op", "s"), ("size", "size", "s"), ("dtype", "dtype", "s"), ("native_ms", "native ms", ".4f"),
               ("reference_ms", "ref ms", ".4f"), ("compiled_ms", "compiled ms", ".4f"),
               ("speedup_vs_reference", "x ref", ".2f"), ("speedup_vs_compiled", "x comp", ".2f"),
               ("bytes", "bytes", "d"), ("native_gbs", "GB/s", ".2f"), ("native_gflops", "GFLOP/s", ".2f"),
               ("pct_peak_flops", "% peak FLOP", ".2f")]
    if device.type == "cuda":
        columns.append(("pct_peak_bandwidth", "% peak BW", ".1f"))
    table_rows = [dict(r) for r in rows]
    if len(capabilities) > 1:
        for r in table_rows:
            for cap in capabilities:
                r[f"x ref {cap}"] = r["speedup_vs_reference_by_capability"][cap]
                r[f"x comp {cap}"] = (r.get("speedup_vs_compiled_by_capability") or {}).get(cap)
        columns += [(f"x ref {cap}", f"x ref [{cap}]", ".2f") for cap in capabilities]
        columns += [(f"x comp {cap}", f"x comp [{cap}]", ".2f") for cap in capabilities]
    print(format_table(table_rows, columns))
    write_json(args.json, rows, meta)
    return rows


if __name__ == "__main__":
    main()
