"""Energies of trained networks on each test set: where the energy score puts the ID images, the training outliers
and every OOD set. The measurement behind docs/reproduction.md's Energy-OE finding (Sphere-OOD ranked as ID).

    python bench/energy_probe.py [--runs runs/compare/fashion-mnist_st1000_b128_n2000_tNone] [--seed 0] [--methods standard energy-oe cmg-energy oe]
        [--data fashion-mnist] [-n 1000]

Reads the ``model.pt`` files ``bench/compare_methods.py`` wrote (``--runs``/s``SEED``/``METHOD``/model.pt) and prints,
per network and set, the median energy ``-logsumexp(logits)`` with its 5% and 95% quantiles (lower = more ID), then
each set's median pixel-space L2 norm and the fraction of pixels outside the data range [-1, 1].
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastood.data import auxiliary_outliers, benchmark  # noqa: E402
from fastood.model_files import load_model  # noqa: E402


def image_sets(data: str, n: int) -> dict:
    bench = benchmark(data)
    g = torch.Generator().manual_seed(0)
    sets = {"ID test": bench.id_test.images[torch.randperm(len(bench.id_test), generator=g)[:n]],
            "blobs (training outliers)": auxiliary_outliers("blobs", n=n, shape=tuple(bench.id_test.images.shape[1:]),
                                                            seed=100).images}
    sets.update({name: ds.images[:n] for name, ds in bench.ood.items()})
    return sets


@torch.no_grad()
def energies(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out[0] if isinstance(out, (tuple, list)) else out  # a two-head model: head 1
    return -torch.logsumexp(logits.float(), dim=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/compare/fashion-mnist_st1000_b128_n2000_tNone",
                   help="compare_methods' folder of one budget (--out/<data>_st<steps>_b<batch>_n<eval>_t<train-n>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["standard", "energy-oe", "cmg-energy", "oe"])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("-n", type=int, default=1000, help="images per set")
    args = p.parse_args(argv)
    sets = image_sets(args.data, args.n)
    for method in args.methods:
        path = os.path.join(args.runs, f"s{args.seed}", method, "model.pt")
        model = load_model(path)["module"].eval()
        cells = []
        for name, x in sets.items():
            e = energies(model, x)
            cells.append(f"{name}: {e.median():.1f} [{e.quantile(0.05):.1f}, {e.quantile(0.95):.1f}]")
        print(f"{method} | " + " | ".join(cells))
    for name, x in sets.items():
        flat = x.flatten(1)
        print(f"{name}: pixel norm median {flat.norm(dim=1).median():.1f}, "
              f"pixels outside [-1, 1]: {((x < -1) | (x > 1)).float().mean():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
