"""Small helpers shared by the bench/ scripts: device argument, timing, a text table, JSON output.

Usage in a script::

    from _common import add_common_args, resolve_device, median_seconds, print_table, write_json, environment

    parser = argparse.ArgumentParser()
    add_common_args(parser)                          # --device, --json PATH, --quick
    args = parser.parse_args()
    device = resolve_device(parser, args.device)     # torch.device; parser.error if CUDA is missing
    t = median_seconds(lambda: work(), device, warmup=1, repeats=5)
    ts = interleaved_medians({"a": run_a, "b": run_b}, device, repeats=3)   # round-robin, fair under load
    print_table(rows, [("name", "model", "s"), ("images_per_s", "images/s", ".1f")])
    write_json(args.json, rows, environment(device))  # no-op when args.json is None

Scripts import it as ``_common`` after putting bench/ on ``sys.path`` (it is not part of the package).
"""
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch


def add_common_args(parser, default_device=None):
    """Add ``--device cpu|cuda`` (default: cuda when available), ``--json PATH`` and ``--quick`` to ``parser``."""
    default = default_device or ("cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device", default=default, choices=["cpu", "cuda"],
                        help="where to run (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON to PATH")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repetition (smoke test, CI)")
    return parser


def resolve_device(parser, name):
    """``torch.device(name)``; reports a parser error when CUDA is requested but unavailable."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    return device


def sync(device):
    """Wait for queued work on ``device`` (CUDA); nothing on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, warmup=1, repeats=5, min_time=0.0):
    """Median wall time in seconds of ``fn()`` after ``warmup`` untimed calls.

    Times at least ``repeats`` calls and keeps going until ``min_time`` seconds have been spent; the device is
    synchronized around every call so asynchronous CUDA work is counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns, device, warmup=None, repeats=3, min_time=0.0, max_rounds=50):
    """Median wall seconds of each callable in ``fns``, timed round-robin (see :func:`interleaved_times`)."""
    times = interleaved_times(fns, device, warmup, repeats, min_time, max_rounds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(fns, device, warmup=None, repeats=3, min_time=0.0, max_rounds=50):
    """Wall seconds of every call of each zero-argument callable in ``fns`` ({name: fn}), timed round-robin.

    Calls rotate (a, b, c, a, b, c, ...) so that load from other processes hits every candidate alike. At least
    ``repeats`` rounds run, more while less than ``min_time`` seconds have passed (at most ``max_rounds``): short
    calls get many samples, which keeps the median steady on a busy machine. ``warmup``: {name: fn} of untimed
    calls made once before timing (default: each fn once).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for name, fn in (fns if warmup is None else warmup).items():
        fn()
    sync(device)
    times = {name: [] for name in fns}
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - start < min_time and rounds < max_rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def format_value(value, spec):
    """``value`` formatted with ``spec`` ("" or "s" for str); None -> "n/a"."""
    if value is None:
        return "n/a"
    if spec in ("", "s") or isinstance(value, str):
        return str(value)
    return format(value, spec)


def format_table(rows, columns):
    """A text table of ``rows`` (dicts). ``columns``: (key, header, format spec) triples; missing values -> n/a."""
    cells = [[format_value(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(c[i]) for c in cells]) for i, (_, header, _) in enumerate(columns)]
    numeric = [spec not in ("", "s") for _, _, spec in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    header = line([h for _, h, _ in columns])
    return "\n".join([header, "-" * len(header)] + [line(c) for c in cells])


def print_table(rows, columns, title=None, file=None):
    """Print :func:`format_table` (after an optional title line) to ``file`` (default stdout)."""
    out = file or sys.stdout
    if title:
        print(title, file=out)
    print(format_table(rows, columns), file=out)


def environment(device, **extra):
    """Metadata for a JSON report: device and its name, torch version, threads, native ops, and ``extra``."""
    device = torch.device(device)
    try:
        import fastood.ops as ops

        native = ops.native_available() and (device.type == "cpu" or ops.cuda_kernels_available())
    except ImportError:
        native = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    meta = {"device": str(device), "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "native": native, "python": platform.python_version()}
    meta.update(extra)
    return meta


def write_json(path, rows, meta):
    """Write ``{"meta": meta, "rows": rows}`` to ``path`` (directories created); nothing when ``path`` is None."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


def print_per_set_auroc(reports, title="per-set AUROC:"):
    """One line per report (name -> fastood.evaluation.Report): its AUROC on each OOD set, in percent."""
    print(title)
    for name, r in reports.items():
        print(f"  {name:26s} " + ", ".join(f"{k} {100 * v['auroc']:.1f}" for k, v in r.metrics.items()))


def write_reports_json(path, reports):
    """Write ``{name: report.to_dict()}`` to ``path``; nothing when ``path`` is None."""
    if path is None:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({k: r.to_dict() for k, r in reports.items()}, f, indent=2)


# ---- Machine peaks: how close a measurement is to the limit ----

# Published peak figures of the GPUs we report against (dense, no sparsity; NVIDIA datasheets): HBM bandwidth in
# GB/s, FP32 (CUDA cores) and BF16 (tensor cores) TFLOP/s. Matched by substring of the device name, in this order.
GPU_PEAKS = [
    ("H200", {"gbs": 4800.0, "fp32_tflops": 66.9, "bf16_tflops": 989.4, "source": "NVIDIA H200 SXM datasheet"}),
    ("H100 NVL", {"gbs": 3900.0, "fp32_tflops": 60.0, "bf16_tflops": 835.0, "source": "NVIDIA H100 NVL datasheet"}),
    ("H100 PCIe", {"gbs": 2000.0, "fp32_tflops": 51.2, "bf16_tflops": 756.0, "source": "NVIDIA H100 PCIe datasheet"}),
    ("H100", {"gbs": 3350.0, "fp32_tflops": 66.9, "bf16_tflops": 989.4, "source": "NVIDIA H100 SXM datasheet"}),
    ("A100-SXM4-80GB", {"gbs": 2039.0, "fp32_tflops": 19.5, "bf16_tflops": 312.0, "source": "NVIDIA A100 datasheet"}),
    ("A100", {"gbs": 1555.0, "fp32_tflops": 19.5, "bf16_tflops": 312.0, "source": "NVIDIA A100 40GB datasheet"}),
]

# float32 lanes of one FMA instruction per CPU capability of the fastood kernels.
CPU_FMA_LANES = {"avx512": 16, "avx2": 8, "default": 4}
CPU_FMA_PIPES = 2  # FMA units per core: Intel since Haswell and AMD since Zen 2 issue two FMAs per cycle


def cpu_clock_ghz():
    """The CPU clock in GHz as /proc/cpuinfo reports it (the first core's "cpu MHz"), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":")[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None


def cpu_capability():
    """The instruction set of fastood's CPU kernels now ("default", "avx2", "avx512"), or None without them."""
    try:
        import fastood.ops as ops

        return ops.build_info().get("cpu_capability")
    except Exception:  # noqa: BLE001 - a report must not fail on a missing extension
        return None


_GEMM_GFLOPS = {}


def measured_gemm_gflops(threads=None, n=2048, repeats=5):
    """GFLOP/s of a float32 ``torch.mm`` of two n x n matrices on the CPU with ``threads`` threads (torch's
    current count by default): the best of ``repeats`` timed calls after one warm-up, cached per thread count.
    What a tuned BLAS reaches on this machine -- the practical peak. The nominal figure (cores x lanes x FMA pipes
    x clock) misses both ways: /proc/cpuinfo reports the base clock, not the boost clock the cores run at, and
    some cores (AMD Zen 4) execute a 512-bit FMA as two 256-bit halves."""
    threads = threads or torch.get_num_threads()
    if threads not in _GEMM_GFLOPS:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            a, b = torch.randn(n, n), torch.randn(n, n)
            torch.mm(a, b)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - start)
        finally:
            torch.set_num_threads(before)
        _GEMM_GFLOPS[threads] = 2.0 * n ** 3 / best / 1e9
    return _GEMM_GFLOPS[threads]


_FMA_FLOPS = {}


def measured_fma_flops(capability, threads=None, iterations=5_000_000):
    """FLOP/s of the FMA pipes with ``capability``'s vectors on ``threads`` threads (torch's current count by
    default), measured by fastood's native probe (``torch.ops.fastood.cpu_fma_peak_flops``: 12 independent FMA
    chains in registers per thread, the best of three runs), or None without the native extension. Cached."""
    threads = threads or torch.get_num_threads()
    key = (capability, threads)
    if key not in _FMA_FLOPS:
        try:
            importlib.import_module("fastood.ops")  # loads the extension
            fastood_ops = torch.ops.fastood
            before, threads_before = fastood_ops.cpu_capability(), torch.get_num_threads()
        except (ImportError, AttributeError, RuntimeError):
            return None
        try:
            fastood_ops.set_cpu_capability(capability)
            torch.set_num_threads(threads)
            _FMA_FLOPS[key] = float(fastood_ops.cpu_fma_peak_flops(iterations))
        except RuntimeError:
            _FMA_FLOPS[key] = None
        finally:
            fastood_ops.set_cpu_capability(before)
            torch.set_num_threads(threads_before)
    return _FMA_FLOPS[key]


def machine_peak(device, dtype=torch.float32, capability=None):
    """Peak figures of ``device``: {"flops": FLOP/s or None, "gbs": GB/s or None, "basis": how they were derived}.

    CPU: the measured FMA throughput of the kernels' capability on torch's threads (:func:`measured_fma_flops`,
    fastood's register-resident FMA probe), beside the measured float32 GEMM rate (:func:`measured_gemm_gflops`)
    and the nominal cores x float32 lanes x FMA pipes x 2 FLOPs x clock ("nominal_flops"; /proc/cpuinfo's base
    clock). Neither of the last two is a ceiling: here the GEMM reached 41% of the probed FMA rate and the
    nominal figure missed the boost clock. Without the native extension the GEMM rate stands in. The bandwidth
    is unknown (None). bfloat16 counts at the float32 rate (the kernels compute in float32). GPU: the published
    figures of GPU_PEAKS (FP32 CUDA-core peak, or the BF16 tensor-core peak for bfloat16).
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS:
            if key in name:
                tflops = peak["bf16_tflops"] if dtype == torch.bfloat16 else peak["fp32_tflops"]
                kind = "BF16 tensor" if dtype == torch.bfloat16 else "FP32"
                return {"flops": tflops * 1e12, "gbs": peak["gbs"],
                        "basis": f"{name}: {kind} {tflops} TFLOP/s, {peak['gbs']:.0f} GB/s ({peak['source']})"}
        return {"flops": None, "gbs": None, "basis": f"{name}: no published figures in bench/_common.py"}
    capability = capability or cpu_capability() or "default"
    lanes = CPU_FMA_LANES.get(capability, 4)
    ghz, cores = cpu_clock_ghz(), torch.get_num_threads()
    gemm = measured_gemm_gflops(cores)
    fma = measured_fma_flops(capability, cores)
    nominal = None if ghz is None else cores * lanes * CPU_FMA_PIPES * 2 * ghz * 1e9
    nominal_text = ("clock unknown" if nominal is None else
                    f"{cores} cores x {lanes} fp32 lanes ({capability}) x {CPU_FMA_PIPES} FMA pipes x 2 FLOP x "
                    f"{ghz:.2f} GHz = {nominal / 1e9:.0f} GFLOP/s")
    others = f"float32 GEMM {gemm:.0f} GFLOP/s (torch.mm 2048x2048); nominal {nominal_text}"
    if fma is None:
        return {"flops": gemm * 1e9, "fma_flops": None, "gemm_flops": gemm * 1e9, "nominal_flops": nominal,
                "gbs": None, "basis": f"CPU: measured {others} ({cores} threads); memory bandwidth not known"}
    return {"flops": fma, "fma_flops": fma, "gemm_flops": gemm * 1e9, "nominal_flops": nominal, "gbs": None,
            "basis": (f"CPU: measured FMA throughput {fma / 1e9:.0f} GFLOP/s ({capability}, {cores} threads; "
                      f"measured {others}); memory bandwidth not known")}


def percent(value, peak):
    """100 * value / peak, or None when either is unknown."""
    return None if value is None or not peak else 100.0 * value / peak
