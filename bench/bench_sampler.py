"""Langevin sampler benchmark: images/s of FIG's generated samples, the authors' loop vs fastood.

    python bench/bench_sampler.py [--device cpu|cuda] [--json PATH] [--quick] [--cache DIR] [--steps 10]
                                  [--max-steps 20] [--pretrain-epochs 2] [--repeats N] [--min-time S]
                                  [--threads N] [--models smallcnn resnet18_cifar]

Implementations, side by side, on the same model, batch and step budget:

- ``authors-loop``: a re-creation of the FIG authors' sampling loop -- autograd on the batch-summed modified
  energy with the parameters' gradients enabled (``energy.sum().backward()`` also computes every parameter's
  .grad), a second forward per step for the confidence, and their batch-wide stop (mean confidence > 0.9).
- ``fastood-reference``: :class:`fastood.samplers.langevin.LangevinSampler` with the pure-PyTorch ops (one
  forward and one input-only backward per step, no parameter gradients, confidence from the same forward,
  BatchNorm folded into the convolutions, channels-last on CPU, frozen chains compacted out of the batch).
- ``fastood-native``: the same with the fused C++/CUDA ops (n/a when the extension is not built).
- on CUDA also ``fastood-native+graph``: channels-last, bfloat16 autocast and a CUDA graph of the step.

Scenarios:

- ``equal-steps``: ``--steps`` updates for every chain, no early stopping (randomly initialized
  ``resnet18_cifar`` 3x32x32 and ``SmallCNN`` 1x28x28).
- ``early-stop``: at most ``--max-steps`` updates on a ``SmallCNN`` pretrained with ``StandardTrainer`` on
  mnist5k digits 0-4 (cached under ``--cache``, default ``~/.cache/fastood``): the authors' batch-wide rule vs
  fastood's per-chain rule (a chain freezes at confidence >= 0.9 and leaves the batch).

All implementations use the authors' noise (std eps) so that the dynamics agree. images/s = chains / wall time of
one sampling call: the median over rounds of calls timed round-robin, so that load on the machine hits every
implementation alike (at least ``--repeats`` rounds, more until ``--min-time`` seconds have passed). Prints a
table and writes the rows as JSON with ``--json``.

``--quick`` is a smoke test: a narrow untrained SmallCNN only, 8 chains, 2-3 steps, one thread, one round.
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _common import (add_common_args, environment, interleaved_medians, print_table,  # noqa: E402
                     resolve_device, write_json)

import fastood.ops as ops  # noqa: E402
from fastood.models import SmallCNN, resnet18_cifar  # noqa: E402
from fastood.samplers.langevin import LangevinSampler  # noqa: E402

C, STEP_SIZE, DECAY, DECAY_EVERY, THRESHOLD, BOUNDS = 5.0, 0.1, 0.9, 100, 0.9, (-1.0, 1.0)

# Chains per sampling call: (cpu, cuda, quick).
BATCH = {"smallcnn": (256, 8192, 8), "resnet18_cifar": (32, 2048, 2)}


def authors_loop(model, n, shape, steps, batch_stop, device):
    """The FIG authors' sampler as their code runs it (re-created, not copied).

    Per step: autograd through the batch-summed modified energy with parameter gradients enabled, the
    sign-gradient update with noise std eps, then a second forward for the confidence; with ``batch_stop`` the
    whole batch stops once the mean confidence exceeds 0.9. Returns (x, steps taken, confidence [n]).
    """
    lo, hi = BOUNDS
    model.eval()
    x = lo + (hi - lo) * torch.rand((n,) + shape, device=device)
    confidence, taken = None, 0
    for t in range(steps):
        x = x.detach().requires_grad_(True)
        energy = ops.reference.modified_energy(model(x), C)
        energy.sum().backward()                       # also fills every parameter's .grad
        eps = STEP_SIZE * DECAY ** (t // DECAY_EVERY)
        x = torch.clamp(x.detach() - eps / 2 * torch.sign(x.grad) + eps * torch.randn_like(x), lo, hi)
        taken += 1
        with torch.no_grad():
            confidence = torch.softmax(model(x), dim=1).amax(dim=1)   # the second forward
        if batch_stop and float(confidence.mean()) > THRESHOLD:
            break
    model.zero_grad(set_to_none=True)
    return x, taken, confidence


def fastood_run(sampler, backend):
    def run(model, n, shape):
        with ops.use_backend(backend):
            x = sampler.sample(model, n, shape)
        st = sampler.stats
        return x, float(st["steps"].float().mean()), st["confidence"], st["forwards"]
    return run


def implementations(device, steps, early_stop):
    """{name: run(model, n, shape) -> (x, mean updates per chain, confidence [n], images forwarded) or None}."""
    cuda = device.type == "cuda"
    native = ops.native_available() and (not cuda or ops.cuda_kernels_available())

    def sampler(**extra):
        return LangevinSampler(c=C, step_size=STEP_SIZE, decay=DECAY, decay_every=DECAY_EVERY, max_steps=steps,
                               confidence=THRESHOLD, early_stop=early_stop, noise="authors", bounds=BOUNDS, **extra)

    def authors(model, n, shape):
        x, taken, confidence = authors_loop(model, n, shape, steps, batch_stop=early_stop is not None, device=device)
        return x, float(taken), confidence, 2 * taken * n

    impls = {"authors-loop": authors, "fastood-reference": fastood_run(sampler(), "reference"),
             "fastood-native": fastood_run(sampler(), "native") if native else None}
    if cuda:
        impls["fastood-native+graph"] = (fastood_run(sampler(channels_last=True, autocast_bf16=True, cuda_graph=True),
                                                     "native") if native else None)
    return impls


def bench_case(scenario, model_name, model, shape, n, steps, early_stop, device, repeats, pretrained, min_time=0.0):
    """Time every implementation on one (model, batch, step budget); returns the table rows."""
    model = model.to(device).eval()
    impls = implementations(device, steps, early_stop)
    available = {k: v for k, v in impls.items() if v is not None}
    results = {}

    def timed(name, fn):
        def call():
            torch.manual_seed(0)
            results[name] = fn(model, n, shape)
        return call

    calls = {name: timed(name, fn) for name, fn in available.items()}
    seconds = interleaved_medians(calls, device, repeats=repeats, min_time=min_time)
    base = seconds.get("authors-loop")
    rows = []
    for name in impls:
        row = {"scenario": scenario, "model": model_name, "shape": "x".join(map(str, shape)), "impl": name, "n": n,
               "max_steps": steps, "early_stop": {"chain": "per-chain", None: "none"}.get(early_stop, early_stop),
               "pretrained": pretrained, "device": str(device)}
        if name == "authors-loop" and early_stop is not None:
            row["early_stop"] = "batch (authors)"
        if name in seconds:
            x, mean_steps, confidence, forwards = results[name]
            lo, hi = BOUNDS
            row.update({"seconds": seconds[name], "images_per_s": n / seconds[name], "mean_steps": mean_steps,
                        "mean_confidence": float(confidence.float().mean()), "images_forwarded": int(forwards),
                        "in_bounds": bool(((x >= lo) & (x <= hi)).all()),
                        "speedup_vs_authors": None if base is None else base / seconds[name]})
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
    """The issue's speed targets, checked against the measured rows."""
    def speedup(scenario, model, impl):
        for r in rows:
            if (r["scenario"], r["model"], r["impl"]) == (scenario, model, impl):
                return r.get("speedup_vs_authors"), r.get("images_per_s")
        return None, None

    out = []
    if device.type == "cpu":
        for model in sorted({r["model"] for r in rows if r["scenario"] == "equal-steps"}):
            s, _ = speedup("equal-steps", model, "fastood-native")
            out.append({"target": f"cpu equal-steps {model}: native >= 2x authors-loop", "value": s,
                        "met": None if s is None else s >= 2.0})
        s, _ = speedup("early-stop", "smallcnn", "fastood-native")
        out.append({"target": "cpu early-stop pretrained smallcnn: native >= 4x authors-loop", "value": s,
                    "met": None if s is None else s >= 4.0})
    else:
        best = max([speedup("equal-steps", "resnet18_cifar", i)[1] or 0.0
                    for i in ("fastood-native", "fastood-native+graph")])
        out.append({"target": "cuda equal-steps resnet18_cifar: >= 5560 images/s", "value": best or None,
                    "met": best >= 5560 if best else None})
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
    parser.add_argument("--models", nargs="+", choices=sorted(BATCH), default=None,
                        help="models of the equal-steps scenario (default: all; --quick: smallcnn)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.quick:
        torch.set_num_threads(1)  # a smoke run must not fight a busy machine for cores
    models = args.models or (["smallcnn"] if args.quick else list(BATCH))
    column = 2 if args.quick else (1 if device.type == "cuda" else 0)
    steps, max_steps = (2, 3) if args.quick else (args.steps, args.max_steps)
    repeats = args.repeats or (1 if args.quick else 3)
    min_time = 0.0 if args.quick else args.min_time

    rows = []
    shapes = {"smallcnn": (1, 28, 28), "resnet18_cifar": (3, 32, 32)}
    width = 8 if args.quick else 32
    for name in models:
        torch.manual_seed(0)
        model = (SmallCNN(in_channels=1, num_classes=10, image_size=28, width=width) if name == "smallcnn"
                 else resnet18_cifar(10))
        rows += bench_case("equal-steps", name, model, shapes[name], BATCH[name][column], steps, None, device,
                           repeats, pretrained=False, min_time=min_time)
    model, pretrained = pretrained_small_cnn(args)
    rows += bench_case("early-stop", "smallcnn", model, shapes["smallcnn"], BATCH["smallcnn"][column], max_steps,
                       "chain", device, repeats, pretrained=pretrained, min_time=min_time)

    meta = environment(device, steps=steps, max_steps=max_steps, repeats=repeats, min_time=min_time,
                       quick=args.quick, noise="authors (std eps)", confidence_threshold=THRESHOLD)
    print(f"fastood bench_sampler on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
          f"{meta['threads']} threads, native ops: {meta['native']}")
    print_table(rows, [("scenario", "scenario", "s"), ("model", "model", "s"), ("impl", "implementation", "s"),
                       ("n", "chains", "d"), ("early_stop", "stop rule", "s"), ("mean_steps", "steps/chain", ".2f"),
                       ("mean_confidence", "conf", ".3f"), ("seconds", "s/call", ".3f"),
                       ("images_per_s", "images/s", ".1f"), ("speedup_vs_authors", "x authors", ".2f")])
    checks = targets(rows, device)
    if args.quick:  # tiny sizes measure overheads, not the targets
        for c in checks:
            c["met"] = None
    for c in checks:
        status = ("not judged in --quick mode" if args.quick else "n/a") if c["met"] is None else (
            "met" if c["met"] else "NOT met")
        value = "n/a" if c["value"] is None else f"{c['value']:.2f}"
        print(f"target: {c['target']}: {value} ({status})")
    meta["targets"] = checks
    write_json(args.json, rows, meta)
    return rows


if __name__ == "__main__":
    main()
