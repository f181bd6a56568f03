"""Is the n+1 class of Vernekar et al. learned? p(n+1) of the training outliers and of ID test images, per saved
network of ``bench/reproduce_vernekar.py``.

    python bench/reproduce_vernekar.py ...      # trains and caches the networks under --out/models
    python bench/vernekar_mechanism.py [--out runs/vernekar] [--sets fashion-mnist mnist-0to4 ...] [--seed 0]
        [-n 1000] [--fit-n 5000]

For every cached n+1 network
``models/n1_<set>_s<seed>_e<epochs>_lr<lr>_<beta>_c<cvae epochs>[_zmean][_sh<f>][_ellauthors].pt`` (Adadelta runs;
the ``_sgd`` ablation is skipped) it rebuilds the run's ManifoldSampler from the cached CVAE (fitted on ``--fit-n``
training images, the same beta range, type-II shell and ellipsoid factor), draws ``-n`` type-I outliers (off the
manifold, from training images) and ``-n`` type-II outliers (class-boundary decodes), and prints the median p(n+1)
on ID test images, type I and type II, the fraction of type II with p(n+1) > 0.5, and the AUROC of p(n+1) between
ID test images and type II outliers.
The measurement behind docs/reproduction.md's budget finding: near-OOD detection needs the type-II part of the
outlier class, and at 2 epochs it is not learned yet.
"""
import argparse
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import reproduce_vernekar as rv  # noqa: E402
from fastood.data import benchmark, seeded_subset  # noqa: E402
from fastood.metrics import ood_metrics  # noqa: E402

PATTERN = re.compile(r"n1_(?P<set>.+)_s(?P<seed>\d+)_e(?P<epochs>\d+)_lr(?P<lr>[0-9.e-]+)_(?P<beta>paper|authors)"
                     r"_c(?P<cvae>\d+)(?P<zmean>_zmean)?(?:_sh(?P<shell>[0-9.]+))?(?P<ellauthors>_ellauthors)?\.pt$")


def networks(models_dir: str, name: str, seed: int) -> list:
    """``[(epochs, beta, cvae_epochs, variant, path)]`` of the cached Adadelta n+1 networks of one set and seed, by
    epochs; ``variant = (cvae_latent, shell, ellipsoid)``: ``("mean" | "sample", factor, "authors" | "cholesky")``
    (no suffix: a sampled latent, shell 1, Cholesky: the runs before ``--cvae-latent`` / ``--shell`` /
    ``--ellipsoid``)."""
    found = []
    for path in glob.glob(os.path.join(models_dir, f"n1_{name}_s{seed}_e*.pt")):
        m = PATTERN.search(os.path.basename(path))
        if m and m["set"] == name and int(m["seed"]) == seed:
            variant = ("mean" if m["zmean"] else "sample", float(m["shell"]) if m["shell"] else 1.0,
                       "authors" if m["ellauthors"] else "cholesky")
            found.append((int(m["epochs"]), m["beta"], int(m["cvae"]), variant, path))
    return sorted(found)


@torch.no_grad()
def outlier_probability(model, x: torch.Tensor, n_classes: int, batch: int = 500) -> torch.Tensor:
    """p(n+1) [N]: the softmax probability of the last (outlier) output."""
    model.eval()
    return torch.cat([model(x[i:i + batch]).softmax(1)[:, n_classes] for i in range(0, len(x), batch)])


def measure(name: str, seed: int, models_dir: str, n: int, fit_n: int) -> list:
    from fastood.models import VernekarCNN, VernekarCVAE
    from fastood.samplers.manifold import ManifoldSampler

    bench = benchmark(name, seed=seed)
    k = bench.num_classes
    rows, samplers = [], {}
    id_test = seeded_subset(bench.id_test, n, seed).images
    for epochs, beta, cvae_epochs, (latent, shell, ellipsoid), path in networks(models_dir, name, seed):
        key = (beta, cvae_epochs, latent, shell, ellipsoid)
        if key not in samplers:
            cvae_path = os.path.join(models_dir, f"cvae_{name}_s{seed}_e{cvae_epochs}{rv.cvae_suffix(latent)}.pt")
            if not os.path.exists(cvae_path):
                print(f"skip {os.path.basename(path)}: no {cvae_path}")
                continue
            cvae = VernekarCVAE(k, rv.LATENT[rv.source(name)], latent_noise=latent == "sample")
            cvae.load_state_dict(torch.load(cvae_path, map_location="cpu"))
            torch.manual_seed(seed)
            sampler = ManifoldSampler(cvae.eval(), bounds=(-1.0, 1.0), beta_range=beta,
                                      shell=rv.shell_factor(shell), ellipsoid=ellipsoid)
            fit = seeded_subset(bench.id_train, fit_n, seed)
            sampler.fit(DataLoader(fit, batch_size=500))
            x, y = fit.tensors
            samplers[key] = (sampler.type1(x[:n], y[:n]), sampler.type2(n))
        type1, type2 = samplers[key]
        model = VernekarCNN(k + 1)
        model.load_state_dict(torch.load(path, map_location="cpu"))
        p_id, p1, p2 = (outlier_probability(model, z, k) for z in (id_test, type1, type2))
        rows.append({"set": name, "epochs": epochs, "beta": beta, "cvae_epochs": cvae_epochs, "cvae_latent": latent,
                     "shell": shell, "ellipsoid": ellipsoid,
                     "p_id": float(p_id.median()), "p_type1": float(p1.median()), "p_type2": float(p2.median()),
                     "type2_over_half": float((p2 > 0.5).float().mean()),
                     "auroc_type2": 100.0 * ood_metrics(p_id, p2)["auroc"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/vernekar", help="reproduce_vernekar.py's --out")
    p.add_argument("--sets", nargs="+", default=list(rv.PAPER), choices=list(rv.PAPER))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=1000, help="ID test images and outliers of each type")
    p.add_argument("--fit-n", type=int, default=5000, help="training images the sampler's class ellipsoids fit")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.n < 1 or args.fit_n < 1:
        p.error(f"-n and --fit-n must be >= 1, got {args.n} and {args.fit_n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print("set | epochs | beta | CVAE epochs | CVAE latent | shell | ellipsoid"
          " | median p(n+1): ID test / type I / type II | type II with p(n+1) > 0.5"
          " | AUROC p(n+1), type II vs ID test")
    found = 0
    for name in args.sets:
        for r in measure(name, args.seed, os.path.join(args.out, "models"), args.n, args.fit_n):
            found += 1
            print(f"{r['set']} | {r['epochs']} | {r['beta']} | {r['cvae_epochs']} | {r['cvae_latent']} | "
                  f"{r['shell']:g} | {r['ellipsoid']} | {r['p_id']:.3f} / "
                  f"{r['p_type1']:.3f} / {r['p_type2']:.3f} | {100 * r['type2_over_half']:.0f}% | "
                  f"{r['auroc_type2']:.1f}")
    if not found:
        print(f"no n+1 networks under {os.path.join(args.out, 'models')}: run bench/reproduce_vernekar.py first")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
