"""Vernekar et al. (2019), "Out-of-distribution detection in classifiers via generation", Table 1, reproduced on
full MNIST and Fashion-MNIST and printed beside the paper's numbers.

    python bench/reproduce_vernekar.py [--sets mnist fashion-mnist mnist-0to4 fashion-mnist-0to4] [--seeds 0]
        [--epochs 3] [--cvae-epochs 10] [--eval-n 2000] [--out runs/vernekar] [--quick] [--quiet]

The paper's setup (appendix B and the authors' notebooks, sverneka/OODGen ``*/cvae_generic_batchwise_mahalanobis``):
- the authors' CVAE (:class:`fastood.models.VernekarCVAE`; latent 8 for MNIST, 10 for Fashion-MNIST), RMSprop
  (Keras defaults: lr 1e-3, rho 0.9, eps 1e-7), batch 128 (paper: up to 100 epochs, early stopping patience 5),
  its decoder fed the mean encoding in training as the notebooks do (``--cvae-latent sample`` for a VAE's sample);
- the authors' classifier (:class:`fastood.models.VernekarCNN`) with n + 1 outputs, trained from scratch with
  Adadelta (lr 0.01 for MNIST, 0.1 for Fashion-MNIST; Keras' rho 0.95, eps 1e-7), batches of 128 ID images + 64
  type-I + 64 type-II outliers (:class:`fastood.trainers.ManifoldTrainer`, ratio 2:1:1), outlier class weight 0.1,
  type-II latents ``m + rho C u`` with rho ~ U(r, 1.5 r), r each class's 95% Mahalanobis radius, and C the notebooks'
  factor (their Cholesky loop drops a term: :func:`fastood.samplers.manifold.authors_ellipsoid_factor`;
  ``--shell 1 --ellipsoid cholesky`` for the text's points on the ellipsoid),
  beta ~ U(0.1, 28) of the data range with a random sign (the notebooks', which produced the paper's tables;
  ``--beta paper`` for the text's U[0.1, 1]: measured on ID Fashion-MNIST, seed 0, at this budget, it leaves p(n+1)
  at AUROC 17 / 11 / 1 on Gaussian / uniform / sphere noise, where the authors' range gives 100 / 100 / 100);
  (paper: 200 epochs);
- scores: p(n+1) (:class:`~fastood.detectors.ExtraClass`) for the 10-class sets, the maximum ID-class probability
  (:class:`~fastood.detectors.MaxIDProbability`) for the 0-4 splits, as the paper says;
- baselines: the same classifier with n outputs and the same optimizer and budget ("before": its ID accuracy),
  scored by MSP, ODIN (T = 1000, eps = 0.0014, not tuned) and Mahalanobis (penultimate layer, no input noise,
  not tuned) -- the paper tuned ODIN / Mahalanobis on OOD validation data.

Budget (2 CPU cores): ``--epochs`` classifier epochs (default 3; the paper: 200) and ``--cvae-epochs`` (default 10).
Evaluation on ``--eval-n`` ID test images and as many per OOD set (seeded subsets; accuracy on the full test set).
Not reachable here: EMNIST-letters, NotMNIST, Omniglot (rows marked "not reachable").

Every finished cell (one ID set x seed) is cached under ``--out``/cells, every trained network under
``--out``/models, and each training checkpoints under ``--out``/ckpt: an interrupted run continues where it stopped.
Writes ``--out``/vernekar_table.{txt,md,json,csv} and prints ``paper | fastood (mean +- std) | difference``.
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastood.data import benchmark, seeded_subset  # noqa: E402
from fastood.protocol import PaperRow, Stopwatch, cached_model, open_run, report, run_grid  # noqa: E402

#: Table 1 of the paper (AUROC %, accuracy %). None = a column of the paper that is not reachable here.
PAPER = {
    "mnist": {"auroc": {"fashion-mnist": 100.0, "gaussian": 100.0, "uniform": 100.0, "sphere": 100.0},
              "acc_before": 99.0, "acc_after": 98.9,
              "unreachable": ("emnist-letters", "notmnist", "omniglot")},
    "fashion-mnist": {"auroc": {"mnist": 98.7, "gaussian": 99.8, "uniform": 99.8, "sphere": 99.7},
                      "acc_before": 91.9, "acc_after": 91.2,
                      "unreachable": ("emnist-letters", "notmnist", "omniglot")},
    "mnist-0to4": {"auroc": {"mnist-5to9": 93.8}, "acc_before": 99.8, "acc_after": 99.5, "unreachable": ()},
    "fashion-mnist-0to4": {"auroc": {"fashion-mnist-5to9": 92.5}, "acc_before": 94.2, "acc_after": 94.8,
                           "unreachable": ()},
}
LATENT = {"mnist": 8, "fashion-mnist": 10}
ADADELTA_LR = {"mnist": 0.01, "fashion-mnist": 0.1}


def source(name: str) -> str:
    return "fashion-mnist" if name.startswith("fashion") else "mnist"


def adadelta(lr):
    """Keras' Adadelta (rho 0.95, eps 1e-7) with the authors' learning rate."""
    return lambda params: torch.optim.Adadelta(params, lr=lr, rho=0.95, eps=1e-7)


def sgd(lr):
    """fastood's ManifoldTrainer default (SGD, momentum 0.9, weight decay 5e-4): the ``--optimizer sgd`` ablation."""
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def shell_factor(shell: float):
    """ManifoldSampler's ``shell`` for a ``--shell`` value: None (type-II radii on the 95% ellipsoid, the text, drawn
    without a random radius as the runs before the flag were) for 1, else the factor (the notebooks'
    ``generate_nd_hyperellipsoid_data``: radii U(r, 1.5 r))."""
    return None if shell == 1.0 else shell


def cvae_suffix(cvae_latent: str) -> str:
    """Cache-name suffix of the CVAE variant: "" for a VAE's sampled latent (the runs made before the authors'
    mean-latent training was found), "_zmean" for the authors'."""
    return "_zmean" if cvae_latent == "mean" else ""


def variant_suffix(args) -> str:
    """Cache-name suffix of the outlier generator: the CVAE variant, the type-II shell and ellipsoid factor ("" =
    the runs before these flags: sampled latent, shell 1, Cholesky)."""
    return (cvae_suffix(args.cvae_latent) + ("" if args.shell == 1.0 else f"_sh{args.shell:g}")
            + ("" if args.ellipsoid == "cholesky" else "_ellauthors"))


def make_optimizer(args, lr):
    return adadelta(lr) if args.optimizer == "adadelta" else sgd(lr)


def rmsprop(params):
    """Keras' RMSprop defaults (the authors' ``vae.compile(optimizer='rmsprop')``)."""
    return torch.optim.RMSprop(params, lr=1e-3, alpha=0.9, eps=1e-7)


@torch.no_grad()
def accuracy(model, ds, num_classes, batch=1000):
    model.eval()
    correct = 0
    for i in range(0, len(ds), batch):
        logits = model(ds.images[i:i + batch])[:, :num_classes]
        correct += int((logits.argmax(1) == ds.labels[i:i + batch]).sum())
    return 100.0 * correct / max(1, len(ds))


def metrics_of(detector, id_loader, ood_loaders, progress):
    from fastood.evaluation import evaluate

    report = evaluate(detector, id_loader, ood_loaders, progress=progress)
    return {k: {m: 100.0 * v for m, v in d.items()} for k, d in report.metrics.items()}


def run_cell(name, seed, args, cells, log):
    """Train and evaluate one ID set with one seed; returns the cell's dict (cached by the caller)."""
    from fastood.detectors import ODIN, MSP, ExtraClass, Mahalanobis, MaxIDProbability
    from fastood.models import VernekarCNN, VernekarCVAE
    from fastood.samplers.manifold import ManifoldSampler
    from fastood.trainers.cvae import CVAETrainer
    from fastood.trainers.manifold import ManifoldTrainer
    from fastood.trainers.standard import StandardTrainer

    sw = Stopwatch()
    progress = not args.quiet
    bench = benchmark(name, seed=seed)
    if args.train_n is not None:
        bench.id_train = seeded_subset(bench.id_train, args.train_n, seed)
    n = bench.num_classes
    src = source(name)
    lr = (ADADELTA_LR[src] if args.optimizer == "adadelta" else 0.01) if args.lr is None else args.lr
    tag = f"{name}_s{seed}_e{args.epochs}_lr{lr}" + ("" if args.optimizer == "adadelta" else f"_{args.optimizer}")
    ckpt = os.path.join(cells.root, "ckpt")
    loader = DataLoader(bench.id_train, batch_size=128, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))

    # Baseline: the same network with n outputs, the same optimizer and budget.
    def train_plain(model):
        torch.manual_seed(seed)
        StandardTrainer(model, optimizer=make_optimizer(args, lr), scheduler=None, seed=seed, progress=progress,
                        checkpoint_dir=os.path.join(ckpt, f"plain_{tag}")).fit(loader, epochs=args.epochs)

    with sw("train_plain"):
        torch.manual_seed(seed)
        plain = cached_model(cells, f"plain_{tag}", VernekarCNN(n), train_plain, log)

    cvae_name = f"cvae_{name}_s{seed}_e{args.cvae_epochs}" + cvae_suffix(args.cvae_latent)

    def train_cvae(cvae):
        CVAETrainer(cvae, optimizer=rmsprop, scheduler=None, seed=seed, progress=progress,
                    checkpoint_dir=os.path.join(ckpt, cvae_name)).fit(loader, epochs=args.cvae_epochs)

    with sw("train_cvae"):
        torch.manual_seed(seed)
        cvae = cached_model(cells, cvae_name,
                            VernekarCVAE(n, LATENT[src], latent_noise=args.cvae_latent == "sample"), train_cvae, log)
    cvae.eval()
    n1_name = f"n1_{tag}_{args.beta}_c{args.cvae_epochs}" + variant_suffix(args)

    def train_n1(model):
        torch.manual_seed(seed)
        sampler = ManifoldSampler(cvae, bounds=(-1.0, 1.0), beta_range=args.beta, shell=shell_factor(args.shell),
                                  ellipsoid=args.ellipsoid)
        ManifoldTrainer(model, sampler, ood_weight=0.1, ratio=(2, 1, 1), optimizer=make_optimizer(args, lr),
                        scheduler=None, seed=seed, progress=progress,
                        checkpoint_dir=os.path.join(ckpt, n1_name)).fit(loader, epochs=args.epochs)

    with sw("train_n1"):
        torch.manual_seed(seed)
        n1 = cached_model(cells, n1_name, VernekarCNN(n + 1), train_n1, log)

    plain.eval()
    n1.eval()
    id_eval = seeded_subset(bench.id_test, args.eval_n, seed)
    id_loader = DataLoader(id_eval, batch_size=500)
    ood_loaders = {k: DataLoader(seeded_subset(v, args.eval_n, seed), batch_size=500)
                   for k, v in bench.ood.items()}
    own = ExtraClass(n1) if name in ("mnist", "fashion-mnist") else MaxIDProbability(n1)
    other = MaxIDProbability(n1) if name in ("mnist", "fashion-mnist") else ExtraClass(n1)
    out = {"name": name, "seed": seed, "epochs": args.epochs, "cvae_epochs": args.cvae_epochs, "lr": lr,
           "optimizer": args.optimizer,
           "beta": args.beta, "cvae_latent": args.cvae_latent, "shell": args.shell, "ellipsoid": args.ellipsoid,
           "n_train": len(bench.id_train), "n_eval_id": len(id_eval)}
    with sw("evaluate"):
        out["acc_before"] = accuracy(plain, bench.id_test, n)
        out["acc_after"] = accuracy(n1, bench.id_test, n)
        out["n1_own"] = {"detector": own.name, "metrics": metrics_of(own, id_loader, ood_loaders, progress)}
        out["n1_other"] = {"detector": other.name, "metrics": metrics_of(other, id_loader, ood_loaders, progress)}
        out["baselines"] = {}
        maha = Mahalanobis(plain)
        maha.fit(loader)
        for det in (MSP(plain), ODIN(plain), maha):
            out["baselines"][det.name] = metrics_of(det, id_loader, ood_loaders, progress)
    out["times_s"] = sw.times
    log(f"{name} seed {seed}: acc {out['acc_before']:.2f} -> {out['acc_after']:.2f}; AUROC "
        + ", ".join(f"{k} {v['auroc']:.1f}" for k, v in out["n1_own"]["metrics"].items()))
    return out


def build_rows(results, sets):
    rows = []
    for name in sets:
        paper = PAPER[name]
        got = [r for r in results if r["name"] == name]
        table = f"Table 1, ID {name}"
        for ood, value in paper["auroc"].items():
            rows.append(PaperRow(table, f"AUROC vs {ood} ({'p(n+1)' if name in LATENT else 'max ID prob.'})",
                                 value, [r["n1_own"]["metrics"][ood]["auroc"] for r in got]))
        for ood in paper["unreachable"]:
            rows.append(PaperRow(table, f"AUROC vs {ood}", None, [], note="not reachable on this machine"))
        rows.append(PaperRow(table, "ID accuracy before (n classes)", paper["acc_before"],
                             [r["acc_before"] for r in got]))
        rows.append(PaperRow(table, "ID accuracy after (n+1 classifier)", paper["acc_after"],
                             [r["acc_after"] for r in got]))
        if got:
            oods = list(got[0]["n1_own"]["metrics"])
            for metric in ("fpr95", "detection_error", "aupr_in", "aupr_out"):
                for ood in oods:
                    rows.append(PaperRow(table, f"{metric} vs {ood}", None,
                                         [r["n1_own"]["metrics"][ood][metric] for r in got],
                                         note="paper's value not transcribed"))
            for det in got[0]["baselines"]:
                for ood in oods:
                    rows.append(PaperRow(table, f"baseline {det} AUROC vs {ood}", None,
                                         [r["baselines"][det][ood]["auroc"] for r in got],
                                         note="same CNN, n outputs, same budget"))
            other = got[0]["n1_other"]["detector"]
            for ood in oods:
                rows.append(PaperRow(table, f"n+1 scored by {other}: AUROC vs {ood}", None,
                                     [r["n1_other"]["metrics"][ood]["auroc"] for r in got]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(PAPER), choices=list(PAPER))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=3, help="classifier epochs (paper: 200)")
    p.add_argument("--cvae-epochs", type=int, default=10, help="CVAE epochs (paper: <= 100, early stopping)")
    p.add_argument("--optimizer", default="adadelta", choices=("adadelta", "sgd"),
                   help="adadelta (the paper's) or sgd (fastood's ManifoldTrainer default, lr 0.01): an ablation")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's Adadelta lr per "
                                                          "data set; 0.01 for sgd)")
    p.add_argument("--beta", default="authors", choices=("paper", "authors"),
                   help="type-I step range: authors (default, the notebooks' U(0.1, 28)) or paper (the text's "
                        "U[0.1, 1])")
    p.add_argument("--cvae-latent", default="mean", choices=("mean", "sample"),
                   help="what the CVAE's decoder sees in training: mean (default, the notebooks': their sampling() "
                        "returns z_mean) or sample (a VAE's reparameterized z: the runs before this flag)")
    p.add_argument("--shell", type=float, default=1.5,
                   help="type-II radii r * U(1, shell), r the 95%% Mahalanobis radius: 1.5 (default, the notebooks' "
                        "U(r, 1.5 r)) or 1 (on the ellipsoid, the text)")
    p.add_argument("--ellipsoid", default="authors", choices=("authors", "cholesky"),
                   help="type-II latents z = m + r C u: C the notebooks' factor (default: authors, "
                        "fastood.samplers.manifold.authors_ellipsoid_factor) or the Cholesky factor (the text)")
    p.add_argument("--eval-n", type=int, default=2000, help="ID and per-OOD-set images scored")
    p.add_argument("--train-n", type=int, default=None, help="subsample the ID training set (quick runs)")
    p.add_argument("--out", default="runs/vernekar")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny budget (1 epoch on 512 images, 200 eval): minutes")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.cvae_epochs, args.eval_n, args.train_n = 1, 1, 200, args.train_n or 512
    if not (args.shell >= 1.0 and args.shell < float("inf")):
        p.error(f"--shell must be a finite factor >= 1, got {args.shell}")
    cells, log = open_run(args)
    t0 = time.time()

    def key(name, seed):
        return (f"{name}_s{seed}_e{args.epochs}_c{args.cvae_epochs}_{args.beta}_n{args.eval_n}"
                + ("" if args.lr is None else f"_lr{args.lr}")
                + ("" if args.optimizer == "adadelta" else f"_{args.optimizer}")
                + ("" if args.train_n is None else f"_t{args.train_n}") + variant_suffix(args))

    results = run_grid(cells, args.sets, args.seeds, key, lambda name, seed: run_cell(name, seed, args, cells, log),
                       log)
    rows = build_rows(results, args.sets)
    meta = {"command": "python bench/reproduce_vernekar.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "budget": f"classifier {args.epochs} epochs (paper 200) with {args.optimizer}, CVAE {args.cvae_epochs} "
                      f"epochs ({args.cvae_latent} latent), batch 128 ID + 64 type I + 64 type II, beta {args.beta}, "
                      f"type-II shell {args.shell:g}, {args.ellipsoid} ellipsoid factor",
            "evaluation": f"{args.eval_n} ID test images and {args.eval_n} per OOD set (accuracy: full test set)",
            "seeds": args.seeds, "wall_s (this invocation)": round(time.time() - t0, 1),
            "cell wall_s": {f"{r['name']} s{r['seed']}": r.get("wall_s") for r in results}}
    report(args.out, "vernekar_table", rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
