"""Langevin sampler benchmark: images/s of FIG's generated samples, the authors' loop vs fastood.

    python bench/bench_sampler.py [--device cpu|cuda] [--json PATH] [--quick] [--cache DIR] [--steps 10]
                                  [--max-steps 20] [--pretrain-epochs 2] [--repeats N] [--min-time S]
                                  [--threads N] [--models smallcnn resnet18_cifar]
                                  [--precisions fp32 bf16 auto] [--dtype fp32|bf16|fp16|auto]
                                  [--cuda-graphs on|off] [--channels-last] [--no-memory]

Implementations, side by side, on the same model, batch and step budget:

- ``authors-loop``: a re-creation of the FIG authors' sampling loop -- the input gradient of the batch-summed
  modified energy (``torch.autograd.grad(E.sum(), [x])``, as their code takes it: no parameter gradients), a
  second forward per step for the confidence, and their batch-wide stop (mean confidence > 0.9).
- ``fastood-reference``: :class:`fastood.samplers.langevin.LangevinSampler` with the pure-PyTorch ops (one
  forward and one input-only backward per step, no parameter gradients, confidence from the same forward,
  BatchNorm folded into the convolutions, channels-last on CPU, frozen chains compacted out of the batch).
- ``fastood-native``: the same with the fused C++/CUDA ops (n/a when the extension is not built), one row per
  ``--precisions`` entry (``LangevinSampler(precision=...)``; default fp32, bf16 and auto): the ``precision`` column
  says what was asked and what ran (``auto->fp32``), fastood's default is ``auto``.
- on CUDA also ``fastood-native+graph``: channels-last, bfloat16 autocast and a CUDA graph of the step. With any
  of ``--dtype``, ``--cuda-graphs``, ``--channels-last`` (the last two CUDA only) the native rows are replaced by one
  ``fastood-native[...]`` row configured by those switches (``scripts/gpu_check.sh`` runs each combination).

Scenarios:

- ``equal-steps``: ``--steps`` updates for every chain, no early stopping (randomly initialized
  ``resnet18_cifar`` 3x32x32 and ``SmallCNN`` 1x28x28).
- ``early-stop``: at most ``--max-steps`` updates on a ``SmallCNN`` pretrained with ``StandardTrainer`` on
  mnist5k digits 0-4 (cached under ``--cache``, default ``~/.cache/fastood``): the authors' batch-wide rule vs
  fastood's per-chain rule (a chain freezes at confidence >= 0.9 and leaves the batch).

All implementations use the authors' noise (std eps) so that the dynamics agree. Next to images/s each row reports
the Langevin updates performed per chain (``sampler.stats["steps"]`` for fastood), the work done -- FLOPs of one
model forward and of one input backward per image, counted with ``torch.utils.flop_counter`` on the model as
given (fastood folds BatchNorm, so it does slightly less) -- and the achieved FLOP/s as a fraction of the
machine's peak (_common.machine_peak: CPU the FMA throughput measured by a native probe, with the measured GEMM
rate and the nominal cores x FMA width x clock next to it; GPU the card's published FP32 or, with ``--dtype bf16``,
BF16 tensor peak). images/s = chains / wall time of one sampling call: the median over rounds of calls timed round-robin, so that load on the machine hits every
implementation alike (at least ``--repeats`` rounds, more until ``--min-time`` seconds have passed). Prints a
table and writes the rows as JSON with ``--json``.

Peak memory per row (unless ``--no-memory``), from one extra call of each implementation after the timing: on CUDA
``torch.cuda.max_memory_allocated`` (reset before the call) minus the memory allocated before it; on CPU the
resident-set high-water mark (Linux: ``VmHWM`` of /proc/self/status, reset before each call through
/proc/self/clear_refs) minus the resident set before the call; where the mark cannot be reset,
``resource.getrusage`` (the process's peak so far: only an upper bound). The early-stop scenario also runs the
default native sampler at 4x the step budget: the chains' memory must not grow with ``max_steps``.

``--quick`` is a smoke test: a narrow untrained SmallCNN only, 8 chains, 2-3 steps, one thread, one round.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import (add_common_args, environment, interleaved_medians, machine_peak, percent,  # noqa: E402
                     print_table, resolve_device, write_json)

import fastood.ops as ops  # noqa: E402
from fastood.models import SmallCNN, resnet18_cifar  # noqa: E402
from fastood.samplers.langevin import LangevinSampler  # noqa: E402
from fastood.samplers.precision import PRECISIONS, bf16_native  # noqa: E402

C, STEP_SIZE, DECAY, DECAY_EVERY, THRESHOLD, BOUNDS = 5.0, 0.1, 0.9, 100, 0.9, (-1.0, 1.0)

# Chains per sampling call: (cpu, cuda, quick).
BATCH = {"smallcnn": (256, 8192, 8), "resnet18_cifar": (32, 2048, 2)}


def authors_loop(model, n, shape, steps, batch_stop, device):
    """The FIG authors' sampler as their code runs it (re-created, not copied).

    Per step: the input gradient of the batch-summed modified energy (``torch.autograd.grad(E.sum(), [x])``;
    their code never fills parameter gradients), the sign-gradient update with noise std eps, then a second
    forward for the confidence; with ``batch_stop`` the whole batch stops once the mean confidence exceeds 0.9.
    Returns (x, steps taken, confidence [n]).
    """
    lo, hi = BOUNDS
    model.eval()
    x = lo + (hi - lo) * torch.rand((n,) + shape, device=device)
    confidence, taken = None, 0
    for t in range(steps):
        x = x.detach().requires_grad_(True)
        energy = ops.reference.modified_energy(model(x), C)
        (grad,) = torch.autograd.grad(energy.sum(), [x])  # input gradient only
        eps = STEP_SIZE * DECAY ** (t // DECAY_EVERY)
        x = torch.clamp(x.detach() - eps / 2 * torch.sign(grad) + eps * torch.randn_like(x), lo, hi)
        taken += 1
        with torch.no_grad():
            confidence = torch.softmax(model(x), dim=1).amax(dim=1)   # the second forward
        if batch_stop and float(confidence.mean()) > THRESHOLD:
            break
    return x, taken, confidence


def fastood_run(sampler, backend):
    def run(model, n, shape):
        with ops.use_backend(backend):
            x = sampler.sample(model, n, shape)
        st = sampler.stats
        return x, float(st["steps"].float().mean()), st["confidence"], st["forwards"], st["precision"]
    run.sampler = sampler
    return run


def requested_precision(name):
    """The precision an implementation's name asks for: ``fastood-native[bf16]`` -> bf16, a CUDA variant's first
    part, fp32 otherwise (the authors' loop and the reference rows run float32)."""
    if name == "fastood-native+graph":
        return "bf16"
    if name.startswith("fastood-native["):
        return name[len("fastood-native["):-1].split(",")[0]
    return "fp32"


def native_variant_name(dtype, cuda_graphs, channels_last):
    """Row name of the configured CUDA native implementation, e.g. ``fastood-native[bf16,graph,channels_last]``."""
    parts = [dtype, "graph" if cuda_graphs else "no-graph"] + (["channels_last"] if channels_last else [])
    return f"fastood-native[{','.join(parts)}]"


def native_name(precision):
    """Row name of the native sampler at one precision: ``fastood-native`` (fp32, as before) or
    ``fastood-native[bf16]``."""
    return "fastood-native" if precision == "fp32" else f"fastood-native[{precision}]"


def implementations(device, steps, early_stop, variant=None, precisions=("fp32",)):
    """{name: run(model, n, shape) -> (x, mean updates per chain, confidence [n], images forwarded) or None}.

    variant: None, or (dtype "fp32"|"bf16"|"fp16"|"auto", cuda_graphs bool, channels_last bool) for one configured
    native row, or a list of such tuples (``--grid``: one row each). precisions: the native rows'
    ``LangevinSampler(precision=...)`` otherwise.
    """
    cuda = device.type == "cuda"
    native = ops.native_available() and (not cuda or ops.cuda_kernels_available())

    def sampler(**extra):
        return LangevinSampler(c=C, step_size=STEP_SIZE, decay=DECAY, decay_every=DECAY_EVERY, max_steps=steps,
                               confidence=THRESHOLD, early_stop=early_stop, noise="authors", bounds=BOUNDS, **extra)

    def authors(model, n, shape):
        x, taken, confidence = authors_loop(model, n, shape, steps, batch_stop=early_stop is not None, device=device)
        return x, float(taken), confidence, 2 * taken * n, "fp32"

    impls = {"authors-loop": authors, "fastood-reference": fastood_run(sampler(precision="fp32"), "reference")}
    if variant is not None:
        for dtype, graphs, channels_last in ([variant] if isinstance(variant, tuple) else variant):
            impls[native_variant_name(dtype, graphs, channels_last)] = (fastood_run(sampler(
                channels_last=channels_last, precision=dtype, cuda_graph=graphs), "native") if native else None)
        return impls
    for precision in precisions:
        impls[native_name(precision)] = fastood_run(sampler(precision=precision), "native") if native else None
    if cuda:
        impls["fastood-native+graph"] = (fastood_run(sampler(channels_last=True, precision="bf16", cuda_graph=True),
                                                     "native") if native else None)
    return impls


def _reset_cpu_peak():
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_heap():
    """Return the C heap's free pages to the kernel (glibc ``malloc_trim(0)``; a no-op elsewhere), so that memory an
    earlier call freed but the allocator still held resident cannot hide this call's peak: without it, a second
    identical call measured 0.3 MiB instead of 184 (3,000 tensors of 64 KB)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)  # returns 1 when memory was released, 0 when there was none: both fine here
    return True


def peak_memory(fn, device):
    """``(peak MiB above the memory in use before the call, how it was measured)`` of one call of ``fn``."""
    import gc

    gc.collect()
    if device.type == "cpu":
        _release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, "cuda max allocated"
    before = _status_kib("VmRSS")
    if before is not None and _reset_cpu_peak():
        fn()
        peak = _status_kib("VmHWM")
        if peak is not None:
            return max(0, peak - before) / 1024, "rss high-water"
    import resource

    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max rss (upper bound)"


def model_flops_per_image(model, shape, device):
    """(forward, input backward) FLOPs per image of ``model`` in eval mode, counted by torch.utils.flop_counter
    on a batch of 2 (the input backward of ``torch.autograd.grad(out.sum(), [x])``, no parameter gradients)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.rand((2,) + tuple(shape), device=device, requires_grad=True)
    try:
        with FlopCounterMode(display=False) as forward_count:
            out = model(x)
        with FlopCounterMode(display=False) as backward_count:
            torch.autograd.grad(out.float().sum(), [x])
    finally:
        model.train(was_training)
    return forward_count.get_total_flops() / 2, backward_count.get_total_flops() / 2


def bf16_peak(device, fp32_peak):
    """The peak a bfloat16 row is measured against: CUDA the card's published BF16 tensor peak; CPU the measured
    bfloat16 GEMM rate (torch.mm 2048x2048, oneDNN: AMX / AVX512-BF16 where the CPU has them) when it beats the
    float32 peak, else the float32 peak (an emulated bfloat16 computes at most at the float32 rate)."""
    if device.type == "cuda":
        return machine_peak(device, torch.bfloat16)
    import time

    a = torch.randn(2048, 2048).bfloat16()
    torch.mm(a, a)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, a)
        best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t0))
    base = (fp32_peak or {}).get("flops") or 0.0
    if best > base:
        return {"flops": best, "basis": f"CPU: measured bfloat16 GEMM {best / 1e9:.0f} GFLOP/s (torch.mm 2048x2048)"}
    return dict(fp32_peak or {}, basis=f"CPU bfloat16 GEMM {best / 1e9:.0f} GFLOP/s is below the float32 peak: "
                                       "the float32 peak")


def bench_case(scenario, model_name, model, shape, n, steps, early_stop, device, repeats, pretrained, min_time=0.0,
               variant=None, peak=None, precisions=("fp32",), memory=True, peak_bf16=None):
    """Time every implementation on one (model, batch, step budget); returns the table rows."""
    model = model.to(device).eval()
    fwd_flops, bwd_flops = model_flops_per_image(model, shape, device)
    impls = implementations(device, steps, early_stop, variant, precisions)
    available = {k: v for k, v in impls.items() if v is not None}
    results = {}

    def timed(name, fn):
        def call():
            torch.manual_seed(0)
            results[name] = fn(model, n, shape)
        return call

    calls = {name: timed(name, fn) for name, fn in available.items()}
    seconds = interleaved_medians(calls, device, repeats=repeats, min_time=min_time)
    ran = {name: results[name][4] for name in results}  # the precision each implementation ran in
    memory_mib = {name: peak_memory(call, device) for name, call in calls.items()} if memory else {}
    base = seconds.get("authors-loop")
    rows = []
    for name in impls:
        row = {"scenario": scenario, "model": model_name, "shape": "x".join(map(str, shape)), "impl": name, "n": n,
               "max_steps": steps, "early_stop": {"chain": "per-chain", None: "none"}.get(early_stop, early_stop),
               "pretrained": pretrained, "device": str(device)}
        if name == "authors-loop" and early_stop is not None:
            row["early_stop"] = "batch (authors)"
        requested = requested_precision(name)
        got = ran.get(name, requested)
        row["precision"] = requested if got == requested else f"{requested}->{got}"
        if name in memory_mib:
            row["peak_mib"], row["memory_basis"] = memory_mib[name]
        if name in seconds:
            x, mean_steps, confidence, forwards, _ = results[name]
            lo, hi = BOUNDS
            # Work: every update is a forward + an input backward per chain; the other forwards (the authors'
            # second forward, fastood's confidence re-forwards) a forward each.
            updates = mean_steps * n
            flops = updates * (fwd_flops + bwd_flops) + max(0.0, float(forwards) - updates) * fwd_flops
            row.update({"seconds": seconds[name], "images_per_s": n / seconds[name], "mean_steps": mean_steps,
                        "updates_per_s": updates / seconds[name],
                        "mean_confidence": float(confidence.float().mean()), "images_forwarded": int(forwards),
                        "in_bounds": bool(((x >= lo) & (x <= hi)).all()),
                        "speedup_vs_authors": None if base is None else base / seconds[name],
                        "forward_gflop_per_image": fwd_flops / 1e9, "input_backward_gflop_per_image": bwd_flops / 1e9,
                        "gflop_per_call": flops / 1e9, "achieved_gflops": flops / seconds[name] / 1e9,
                        "pct_peak_flops": percent(flops / seconds[name], (
                            (peak_bf16 if ran.get(name) == "bf16" and peak_bf16 else peak) or {}).get("flops"))})
        else:
            row.update({"seconds": None, "images_per_s": None, "speedup_vs_authors": None,
                        "note": "native extension not available"})
        rows.append(row)
    return rows


def pretrained_small_cnn(args):
    """(model, pretrained?) -- the cached mnist5k 0-4 SmallCNN, or an untrained one in --quick mode."""
    if args.quick:
        torch.manual_seed(0)
        return SmallCNN(in_channels=1, num_classes=5, image_size=28, width=8), False
    from fastood.pretrain import pretrained_small_cnn as pretrained

    return pretrained("mnist5k-0to4", epochs=args.pretrain_epochs, cache=args.cache, progress=False), True


def targets(rows, device):
    """The issue's speed targets (issue 22: fastood's defaults against the authors' loop in float32), checked
    against the measured rows; the other precisions' speedups are reported beside them, not judged."""
    def speedup(scenario, model, impl):
        for r in rows:
            if (r["scenario"], r["model"], r["impl"]) == (scenario, model, impl):
                return r.get("speedup_vs_authors"), r.get("images_per_s")
        return None, None

    impls = [r["impl"] for r in rows]
    default = native_name("auto") if native_name("auto") in impls else "fastood-native"
    out = []
    if device.type == "cpu":
        goals = {"resnet18_cifar": 2.5, "smallcnn": 2.0}
        for model in sorted({r["model"] for r in rows if r["scenario"] == "equal-steps"}):
            s, _ = speedup("equal-steps", model, default)
            goal = goals.get(model, 2.0)
            out.append({"target": f"cpu equal-steps {model}: {default} (the default) >= {goal}x authors-loop",
                        "value": s, "met": None if s is None else s >= goal})
            for impl in sorted({i for i in impls if i.startswith("fastood-native") and i != default}):
                s, _ = speedup("equal-steps", model, impl)
                if s is not None:
                    out.append({"target": f"cpu equal-steps {model}: {impl} (reported) vs {goal}x", "value": s,
                                "met": None})
        s, _ = speedup("early-stop", "smallcnn", default)
        out.append({"target": f"cpu early-stop pretrained smallcnn: {default} >= 4x authors-loop", "value": s,
                    "met": None if s is None else s >= 4.0})
    else:
        best = max([speedup("equal-steps", "resnet18_cifar", i)[1] or 0.0
                    for i in sorted({r["impl"] for r in rows if r["impl"].startswith("fastood-native")})] or [0.0])
        out.append({"target": "cuda equal-steps resnet18_cifar: >= 5560 images/s", "value": best or None,
                    "met": best >= 5560 if best else None})
    return out


def memory_vs_steps(model, shape, n, steps, device, factor=4):
    """Peak memory (MiB) of the default native sampler on the early-stop case at ``steps`` and ``factor x steps``
    updates, no early stop: the chains' memory must not grow with ``max_steps``."""
    out = {}
    for budget in (steps, factor * steps):
        sampler = LangevinSampler(c=C, step_size=STEP_SIZE, max_steps=budget, early_stop=None, bounds=BOUNDS)
        with ops.use_backend("native" if ops.native_available() else "reference"):
            sampler.sample(model, n, shape)   # warm (folded view, allocator)
            torch.manual_seed(0)
            out[budget] = peak_memory(lambda: sampler.sample(model, n, shape), device)[0]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--cache", help="directory of the cached pretrained SmallCNN (default: ~/.cache/fastood)")
    parser.add_argument("--steps", type=int, default=10, help="updates per chain in equal-steps (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=20, help="step budget in early-stop (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=int, default=2,
                        help="SmallCNN pretraining epochs (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per implementation (default: 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--min-time", type=float, default=20.0,
                        help="keep timing rounds until this many seconds per case (default: %(default)s)")
    parser.add_argument("--models", "--model", nargs="+", choices=sorted(BATCH), default=None,
                        help="models of the equal-steps scenario (default: all; --quick: smallcnn)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="the native rows' LangevinSampler(precision=...) (default: fp32 bf16 auto; --quick: fp32)")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None,
                        help="one configured native row: its precision (with --cuda-graphs / --channels-last on CUDA)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--grid", action="store_true",
                        help="CUDA: one native row per --precisions x CUDA graphs on/off x channels_last on/off, all "
                             "in one process (scripts/gpu_check.sh)")
    parser.add_argument("--cuda-graphs", choices=["on", "off"], default=None,
                        help="CUDA: capture the native sampler's step in a CUDA graph")
    parser.add_argument("--channels-last", action="store_true", help="CUDA: the native sampler in channels_last")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    variant = None
    if args.grid:
        if device.type != "cuda":
            parser.error("--grid varies CUDA graphs and channels_last: CUDA only")
        if args.dtype is not None or args.cuda_graphs is not None or args.channels_last:
            parser.error("--grid takes the precisions from --precisions, not --dtype/--cuda-graphs/--channels-last")
        import itertools

        variant = [(p, g, cl) for p, g, cl in itertools.product(args.precisions or ["fp32", "bf16", "fp16"],
                                                                (True, False), (True, False))]
    elif args.dtype is not None or args.cuda_graphs is not None or args.channels_last:
        if device.type != "cuda" and (args.cuda_graphs == "on" or args.channels_last):
            parser.error("--cuda-graphs on and --channels-last configure the CUDA sampler (on CPU fastood runs "
                         "channels_last when every convolution is folded, and no graphs)")
        variant = (args.dtype or "fp32", args.cuda_graphs == "on", args.channels_last)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.quick:
        torch.set_num_threads(1)  # a smoke run must not fight a busy machine for cores
    models = args.models or (["smallcnn"] if args.quick else list(BATCH))
    column = 2 if args.quick else (1 if device.type == "cuda" else 0)
    steps, max_steps = (2, 3) if args.quick else (args.steps, args.max_steps)
    repeats = args.repeats or (1 if args.quick else 3)
    precisions = args.precisions or (["fp32"] if args.quick else ["fp32", "bf16", "auto"])
    case = dict(variant=variant, precisions=precisions, memory=not args.no_memory)
    min_time = 0.0 if args.quick else args.min_time

    rows = []
    peak = machine_peak(device, torch.bfloat16 if (isinstance(variant, tuple) and variant[0] == "bf16")
                        else torch.float32)
    # % of peak: each row against the peak of the precision it ran in (bfloat16: see bf16_peak)
    peak_bf16 = bf16_peak(device, peak) if any(p in ("bf16", "auto") for p in precisions) or variant else None
    case["peak_bf16"] = peak_bf16
    shapes = {"smallcnn": (1, 28, 28), "resnet18_cifar": (3, 32, 32)}
    width = 8 if args.quick else 32
    for name in models:
        torch.manual_seed(0)
        model = (SmallCNN(in_channels=1, num_classes=10, image_size=28, width=width) if name == "smallcnn"
                 else resnet18_cifar(10))
        rows += bench_case("equal-steps", name, model, shapes[name], BATCH[name][column], steps, None, device,
                           repeats, pretrained=False, min_time=min_time, peak=peak, **case)
    model, pretrained = pretrained_small_cnn(args)
    rows += bench_case("early-stop", "smallcnn", model, shapes["smallcnn"], BATCH["smallcnn"][column], max_steps,
                       "chain", device, repeats, pretrained=pretrained, min_time=min_time, peak=peak, **case)
    growth = None if args.no_memory else memory_vs_steps(model, shapes["smallcnn"], BATCH["smallcnn"][column],
                                                         max_steps, device)

    meta = environment(device, steps=steps, max_steps=max_steps, repeats=repeats, min_time=min_time,
                       quick=args.quick, noise="authors (std eps)", confidence_threshold=THRESHOLD,
                       precisions=precisions, bf16_native=list(bf16_native(device)), peak_bf16=peak_bf16,
                       memory_vs_max_steps=growth,
                       peak=peak, variant=None if variant is None else (
                           native_variant_name(*variant) if isinstance(variant, tuple)
                           else [native_variant_name(*v) for v in variant]))
    print(f"fastood bench_sampler on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
          f"{meta['threads']} threads, native ops: {meta['native']}")
    print(f"precisions: {precisions} (fastood's default: auto); bf16 native here: {meta['bf16_native'][0]} "
          f"({meta['bf16_native'][1]})")
    if peak_bf16:
        print(f"bf16 rows' peak: {peak_bf16['basis']}")
    print(f"peak: {peak['basis']}; work = updates x (forward + input backward) + other forwards, FLOPs counted "
          "by torch.utils.flop_counter")
    print_table(rows, [("scenario", "scenario", "s"), ("model", "model", "s"), ("impl", "implementation", "s"),
                       ("precision", "precision", "s"), ("n", "chains", "d"), ("early_stop", "stop rule", "s"),
                       ("mean_steps", "updates/chain", ".2f"),
                       ("mean_confidence", "conf", ".3f"), ("seconds", "s/call", ".3f"),
                       ("images_per_s", "images/s", ".1f"), ("speedup_vs_authors", "x authors", ".2f"),
                       ("forward_gflop_per_image", "fwd GFLOP/img", ".4f"),
                       ("input_backward_gflop_per_image", "bwd GFLOP/img", ".4f"),
                       ("achieved_gflops", "GFLOP/s", ".1f"), ("pct_peak_flops", "% peak", ".2f"),
                       ("peak_mib", "peak MiB", ".1f")])
    if rows and rows[0].get("memory_basis"):
        print(f"peak MiB: {rows[0]['memory_basis']} above the memory in use before one call")
    if growth:
        (s1, m1), (s2, m2) = sorted(growth.items())
        print(f"memory vs max_steps (default sampler, early-stop model, no stop): {s1} steps {m1:.1f} MiB, "
              f"{s2} steps {m2:.1f} MiB")
    checks = targets(rows, device)
    if args.quick:  # tiny sizes measure overheads, not the targets
        for c in checks:
            c["met"] = None
    for c in checks:
        judged = "reported" if "(reported)" in c["target"] else "n/a"
        status = ("not judged in --quick mode" if args.quick else judged) if c["met"] is None else (
            "met" if c["met"] else "NOT met")
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        print(f"target: {c['target']}: {value} ({status})")
    meta["targets"] = checks
    write_json(args.json, rows, meta)
    return rows


if __name__ == "__main__":
    main()
