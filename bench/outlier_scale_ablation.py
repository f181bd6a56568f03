"""Ablation: train an outlier-exposure method on auxiliary outliers whose norms reach beyond the data range.

    python bench/outlier_scale_ablation.py [--method energy-oe] [--seeds 0] [--fraction 0.5] [--max-scale 4]
        [--data fashion-mnist] [--steps 1000] [--out runs/ablate/outlier-scale] [--quick]

The question it answers (docs/reproduction.md, Energy-OE on Fashion-MNIST): Energy-OE ranks Sphere-OOD images, the
largest-norm images of the benchmark with a third of their pixels outside [-1, 1], as *more* in-distribution than
the ID test images. Is that because no training outlier has such a norm? This script trains the method exactly as
``bench/compare_methods.py`` does (same pretrained network, budget, seeds and evaluation; its ``method_cell``) but
with :func:`scaled_blobs` as the auxiliary outliers: fastood's default blobs, a ``--fraction`` of them multiplied
by a log-uniform factor in ``[1, --max-scale]`` and left unclipped. Prints one line per detector row (AUROC % per
OOD set and their mean, ID accuracy) and writes ``--out``/<method>_s<seed>.json; each finished seed is cached there.

Measured (seed 0, Energy-OE, fraction 0.5, max-scale 4): MNIST 90.2, Gaussian 90.9, uniform 72.5, sphere 6.5,
mean 65.0, against 77.4 / 98.3 / 93.6 / 10.1 (mean 69.9) with the default blobs: large-norm outliers do not cure it.
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import compare_methods  # noqa: E402
from fastood import demo  # noqa: E402
from fastood.data import ImageDataset, auxiliary_outliers  # noqa: E402

OUTLIER_METHODS = ("oe", "energy-oe", "ice")  # the methods that train on ``Context.outlier_loader`` (fed by ``outlier_dataset``)


def scaled_blobs(n: int, shape, seed: int, fraction: float, max_scale: float) -> ImageDataset:
    """``n`` of fastood's default auxiliary blobs [n, C, H, W]; a random ``fraction`` of them (Bernoulli per image)
    multiplied by ``exp(U(0, log max_scale))``, i.e. log-uniform in ``[1, max_scale]``, and not clipped, so their
    norms and pixels reach up to ``max_scale`` times the data range's. Labels -1."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if not (math.isfinite(max_scale) and max_scale >= 1.0):
        raise ValueError(f"max_scale must be a finite number >= 1, got {max_scale!r}")
    base = auxiliary_outliers(demo.DEFAULT_OUTLIERS, n=n, shape=shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 200)
    chosen = torch.rand(n, generator=g) < fraction
    factor = torch.exp(torch.rand(n, generator=g) * math.log(max_scale))
    factor = torch.where(chosen, factor, torch.ones_like(factor))
    return ImageDataset(base.images * factor.view(-1, 1, 1, 1), torch.full((n,), -1, dtype=torch.long),
                        name=f"blobs x[1, {max_scale:g}] ({fraction:g})")


def use_scaled_outliers(fraction: float, max_scale: float):
    """Make :meth:`fastood.demo.Context.outlier_dataset` serve :func:`scaled_blobs` (same count and seed as the
    default; the loader's batch and shuffling are the demo's own). Returns the original method, to restore."""
    original = demo.Context.outlier_dataset

    def outlier_dataset(self):
        n = demo.OUTLIERS_PER_ID_BATCH * len(self.bench.id_train)
        return scaled_blobs(n, self.shape, self.config.seed + 100, fraction, max_scale)

    demo.Context.outlier_dataset = outlier_dataset
    return original


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="energy-oe", choices=OUTLIER_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--max-scale", type=float, default=4.0)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--train-n", type=int, default=None)
    p.add_argument("--cache", default=None, help="pretrained-network cache (default: fastood's, as compare_methods)")
    p.add_argument("--out", default="runs/ablate/outlier-scale")
    p.add_argument("--quick", action="store_true", help="mnist5k-0to4, 4 steps, 64 images per set: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.steps, args.pretrain_epochs, args.eval_n = "mnist5k-0to4", 4, 1, 64
        args.train_n = args.train_n or 256
    if not 0.0 <= args.fraction <= 1.0 or args.max_scale < 1.0:
        p.error(f"--fraction must be in [0, 1] and --max-scale >= 1, got {args.fraction} and {args.max_scale}")
    cell_args = argparse.Namespace(data=args.data, steps=args.steps, batch_size=args.batch_size, eval_n=args.eval_n,
                                   train_n=args.train_n, out=os.path.join(args.out, "runs"), quiet=True,
                                   pretrain_epochs=args.pretrain_epochs, cvae_epochs=1, cache=args.cache, options={})
    os.makedirs(args.out, exist_ok=True)
    original = use_scaled_outliers(args.fraction, args.max_scale)
    try:
        for seed in args.seeds:
            path = os.path.join(args.out, f"{args.method}_f{args.fraction:g}_x{args.max_scale:g}_s{seed}.json")
            if os.path.exists(path):
                with open(path) as fh:
                    result = json.load(fh)
            else:
                t0 = time.time()
                result = compare_methods.method_cell(cell_args, seed, args.method)
                result["wall_s"] = round(time.time() - t0, 1)
                with open(path + ".tmp", "w") as fh:
                    json.dump(result, fh, indent=1)
                os.replace(path + ".tmp", path)
            for row, report in result["rows"].items():
                auroc = report["auroc"]
                print(f"seed {seed} | {row} | " + ", ".join(f"{k} {v:.1f}" for k, v in auroc.items())
                      + f" | mean {sum(auroc.values()) / len(auroc):.1f} | ID accuracy {report['id_accuracy']}")
    finally:
        demo.Context.outlier_dataset = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
