"""FIG and GS on mnist5k-0to4 (or, with --data, full MNIST / Fashion-MNIST): does fine-tuning on the model's own
Langevin samples improve MSP detection?

    python bench/quality_fig.py [--steps 1000 | --epochs N] [--batch-size 128] [--lr 1e-3] [--seeds 3]
                                [--eval-at 62,250,500] [--split-seed 0] [--before] [--no-control] [--batch-stop]
                                [--authors-count] [--no-fig] [--no-gs] [--k K] [--max-steps T]
                                [--noise authors|paper|none] [--penalty entropy|log_entropy]
                                [--data mnist5k-0to4|mnist|fashion-mnist] [--eval-size 2000] [--pretrain-epochs N]
                                [--momentum 0.9] [--weight-decay 5e-4]
                                [--precision fp32 bf16 ...] [--amp bf16 ...] [--trajectory-epochs 0] [--quiet] [--json PATH]

One protocol for every row: the same pretrained model, the same number of optimizer steps, the same batch size and
learning rate, fine-tuning seeds 0..N-1 (data order and sampler noise). By default: the authors' fine-tuning budget
(Lawliet-zzl/FIG ``main_FIG.py``: ``train_finetune`` runs 1000 iterations, ``--batch-size`` 128) at the paper's lr
1e-3 (FIGTrainer's default), i.e. ``--steps 1000 --batch-size 128 --lr 1e-3`` (66 epochs of the 2000 ID training
images). The authors' script itself writes lr 1e-4 into ``FIG()``: ``--lr 1e-4``. Until issue 12 was closed the
protocol was 2 epochs of batch 64 (62 steps): ``--epochs 2 --batch-size 64``; there the entropy term had not yet
been balanced by cross-entropy and ID accuracy was 1-1.5 points down (docs/fidelity.md, FIGTrainer).
``--eval-at`` also evaluates every run after that many steps (rows ``NAME @STEPS``; the run then continues; each
evaluation advances torch's random stream -- a DataLoader iterator draws its seed -- so the later rows are another
draw of the sampler noise than the same run without ``--eval-at``).

1. A SmallCNN pretrained by StandardTrainer on MNIST digits 0-4 (``fastood.pretrain.pretrained_small_cnn``, cached
   under ``--cache``, default ``~/.cache/fastood``).
2. FIG with fastood's defaults (Algorithm 2: LangevinSampler c=5, eps0=0.1, noise std eps as the authors' code, at
   least one update per chain, per-chain stop at confidence 0.9, at most 20 updates; K=0.1, lambda=1, SGD lr 1e-3,
   momentum 0.9, wd 5e-4, BatchNorm frozen). ``--k``, ``--max-steps`` and ``--noise`` change the FIG rows.
3. Controls: ``CE (k=0)`` -- the same fine-tuning without generated samples (FIGTrainer(k=0), the K=0 point of the
   paper's Fig. 1), so a gain can be told apart from more cross-entropy steps; ``GS`` -- the same loop with
   clamped Gaussian noise (std 0.5); with ``--before``, ``FIG (before)`` -- the sampler as it was before issue 12
   (``min_steps=0``: stop test on the starting noise; ``noise="paper"``: variance eps); with ``--batch-stop``,
   ``FIG (batch stop)`` -- the authors' stop rule (``early_stop="batch"``: every chain stops once the batch's mean
   confidence > 0.9, tested after each update); with ``--authors-count``, ``FIG (authors' count)`` -- the authors'
   ``max(int(b K), 1)`` generated samples per batch (6 at b = 64) instead of fastood's ``ceil(b K)`` (7).
4. ``--precision P [P ...]``: the FIG row once per sampler precision (``LangevinSampler(precision=P)``, rows
   ``FIG [P]``, the same seeds), e.g. ``--precision fp32 auto`` or ``--precision fp32 bf16``: the quality A/B of
   issue 22 -- "auto" may pick bfloat16 by default only if AUROC and ID accuracy stay within the seed spread.
   ``--amp P [P ...]`` adds rows ``FIG [P, amp]``: the same with the fine-tuning step itself under bfloat16
   autocast (``FIGTrainer(amp=True)``).

Prints, per run, the MSP (higher score = more OOD) AUROC averaged over the benchmark's OOD sets and the ID accuracy
next to the mechanism figures (Langevin updates per chain, mean and fewest; the generated samples' confidence at
the chains' start and at the sampler's output, means over the run); then the change against the pretrained model
(mean +- std over seeds), the per-set AUROC, a probe of fresh Langevin samples, and, with ``--trajectory-epochs``,
one FIG run evaluated every half epoch. ``--json`` writes everything.
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastood.data import benchmark  # noqa: E402
from fastood.detectors import MSP  # noqa: E402
from fastood.evaluation import compare, evaluate  # noqa: E402
from fastood.pretrain import pretrained_small_cnn  # noqa: E402
from fastood.samplers.langevin import LangevinSampler  # noqa: E402
from fastood.samplers.precision import PRECISIONS  # noqa: E402
from fastood.trainers.fig import FIGTrainer, GaussianNoiseTrainer  # noqa: E402

BASE = "pretrained (CE)"
AUTHORS_STEPS = 1000  # main_FIG.py train_finetune: iteration = 1000
AUTHORS_BATCH = 128   # main_FIG.py --batch-size default
DEFAULT_DATA = "mnist5k-0to4"
DATA = (DEFAULT_DATA, "mnist", "fashion-mnist")


def probe(model, shape, n=256, steps=20, seed=1234):
    """Mean confidence and modified energy of ``n`` fresh Langevin samples (``steps`` updates from uniform noise,
    no early stop) and of the uniform starting noise itself, under a fixed seed."""
    out = {}
    for name, budget in (("noise", 0), ("langevin", steps)):
        torch.manual_seed(seed)
        sampler = LangevinSampler(max_steps=budget, early_stop=None)
        sampler.sample(model, n, shape)
        out[f"{name}_confidence"] = float(sampler.stats["confidence"].mean())
        out[f"{name}_energy"] = float(sampler.stats["energy"].mean())
    return out


def history_summary(history, window=10):
    """Means of the logged generated-sample curves over the first and the last ``window`` steps."""
    keys = [k for k in ("gen_confidence", "gen_entropy", "gen_energy", "sampler_confidence", "sampler_energy",
                        "gen_steps") if k in history[0]]
    head, tail = history[:window], history[-window:]
    return {k: {"first": sum(h[k] for h in head) / len(head), "last": sum(h[k] for h in tail) / len(tail)}
            for k in keys}


class Setup:
    """The benchmark, its loaders and the pretrained model every run starts from."""

    def __init__(self, args):
        self.args = args
        builtin = args.data == DEFAULT_DATA
        # full-data benchmarks: a seeded subset of --eval-size images per OOD set and of the ID test set (speed)
        self.bench = benchmark(args.data, seed=args.split_seed, ood_size=None if builtin else args.eval_size)
        self.shape = tuple(self.bench.shape)
        epochs = args.pretrain_epochs or (6 if builtin else 5)
        self.pretrained = pretrained_small_cnn(args.data, epochs=epochs, seed=args.split_seed, cache=args.cache,
                                               progress=not args.quiet)
        id_test = self.bench.id_test
        if not builtin and args.eval_size < len(id_test):
            keep = torch.randperm(len(id_test), generator=torch.Generator().manual_seed(args.split_seed + 11))
            id_test = torch.utils.data.Subset(id_test, keep[:args.eval_size].sort().values.tolist())
        self.id_test = DataLoader(id_test, batch_size=500)
        self.ood = {name: DataLoader(ds, batch_size=500) for name, ds in self.bench.ood.items()}

    def evaluate(self, model):
        model.eval()
        return evaluate(MSP(model), self.id_test, self.ood, progress=False)

    def trainer(self, trainer_cls, seed, **kwargs):
        model = copy.deepcopy(self.pretrained)
        torch.manual_seed(seed)
        loader = DataLoader(self.bench.id_train, batch_size=self.args.batch_size, shuffle=True, drop_last=True)
        return trainer_cls(model, seed=seed, lr=self.args.lr, momentum=self.args.momentum,
                           weight_decay=self.args.weight_decay, progress=not self.args.quiet, **kwargs), loader


def mechanism(history):
    """Mean over the run of the logged mechanism figures (None where a method logs none)."""
    out = {}
    for key in ("gen_steps", "gen_steps_min", "sampler_start_confidence", "sampler_confidence", "gen_confidence"):
        values = [h[key] for h in history if key in h]
        out[key] = statistics.mean(values) if values else None
    steps_min = [h["gen_steps_min"] for h in history if "gen_steps_min" in h]
    out["fewest_steps"] = min(steps_min) if steps_min else None
    return out


def sampler_kwargs(args, **overrides):
    """LangevinSampler options of the FIG rows: the defaults, with ``--max-steps`` / ``--noise`` when given."""
    out = {}
    if args.max_steps is not None:
        out["max_steps"] = args.max_steps
    if args.noise is not None:
        out["noise"] = None if args.noise == "none" else args.noise
    out.update(overrides)
    return out


def fig_kwargs(args, **sampler_overrides):
    """FIGTrainer options of a FIG row: ``--k`` when given and a sampler built from :func:`sampler_kwargs`."""
    out = {} if args.k is None else {"k": args.k}
    if args.penalty is not None:
        out["penalty"] = args.penalty
    sampler = sampler_kwargs(args, **sampler_overrides)
    if sampler:
        out["sampler"] = LangevinSampler(**sampler)
    return out


def methods(args):
    """(name, trainer class, keyword arguments) of every row."""
    rows = []
    if not args.no_control:
        rows.append(("CE (k=0)", FIGTrainer, {"k": 0.0}))
    if args.before:
        rows.append(("FIG (before)", FIGTrainer,
                     {"sampler": LangevinSampler(min_steps=0, noise="paper")}))
    if args.precision:
        for precision in args.precision:
            rows.append((f"FIG [{precision}]", FIGTrainer, fig_kwargs(args, precision=precision)))
        for precision in args.amp or ():
            rows.append((f"FIG [{precision}, amp]", FIGTrainer, {**fig_kwargs(args, precision=precision), "amp": True}))
    elif not args.no_fig:
        rows.append(("FIG", FIGTrainer, fig_kwargs(args)))
    if args.batch_stop:
        rows.append(("FIG (batch stop)", FIGTrainer, fig_kwargs(args, early_stop="batch")))
    if args.authors_count:
        # the authors' count max(int(b K), 1) with K = 0.1, as k with ceil(k b) = that count (exact: b is the batch)
        k = max(int(args.batch_size * 0.1), 1) / args.batch_size
        rows.append(("FIG (authors' count)", FIGTrainer, {"k": k}))
        if args.batch_stop:
            rows.append(("FIG (batch stop, authors' count)", FIGTrainer,
                         {"k": k, "sampler": LangevinSampler(early_stop="batch")}))
    if not args.no_gs:
        rows.append(("GS", GaussianNoiseTrainer, {}))
    return rows


def trajectory(setup, epochs, seed=0):
    """One FIG run evaluated every half epoch: rows of (step, mean AUROC, ID accuracy, gen confidence, gen steps)."""
    trainer, loader = setup.trainer(FIGTrainer, seed, **fig_kwargs(setup.args))
    every = max(1, len(loader) // 2)
    rows = []
    for steps in range(every, epochs * len(loader) + 1, every):
        trainer.fit(loader, steps=steps)
        report = setup.evaluate(trainer.model)
        recent = trainer.history[-every:]
        rows.append({"step": steps, "auroc": report.average["auroc"], "id_accuracy": report.id_accuracy,
                     "gen_confidence": statistics.mean(h["gen_confidence"] for h in recent),
                     "sampler_confidence": statistics.mean(h["sampler_confidence"] for h in recent),
                     "gen_steps": statistics.mean(h["gen_steps"] for h in recent)})
        trainer.model.train()
    return rows


def parse_args(argv=None):
    """``(parser, args)``; the budget is ``args.steps`` (the authors' 1000 by default) or ``args.epochs``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs of every row, instead of --steps")
    parser.add_argument("--lr", type=float, default=FIGTrainer.default_lr, help="fine-tuning learning rate of every "
                        "row (default: FIGTrainer's, the paper's %(default)s; the authors' script: 1e-4)")
    parser.add_argument("--steps", type=int, help=f"fine-tuning steps of every row (default: the authors' "
                        f"{AUTHORS_STEPS} iterations, unless --epochs is given)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default: %(default)s)")
    parser.add_argument("--k", type=float, help="FIG rows: generated samples per ID sample (default: FIGTrainer's)")
    parser.add_argument("--penalty", choices=("entropy", "log_entropy"),
                        help="FIG rows: FIGTrainer penalty (default: FIGTrainer's, the paper's entropy)")
    parser.add_argument("--max-steps", type=int, help="FIG rows: LangevinSampler max_steps (default: the sampler's)")
    parser.add_argument("--noise", choices=("authors", "paper", "none"),
                        help="FIG rows: LangevinSampler noise (default: the sampler's)")
    parser.add_argument("--eval-at", metavar="STEPS",
                        help="comma-separated step counts at which every run is also evaluated (rows 'NAME @STEPS')")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--trajectory-epochs", type=int, default=0,
                        help="epochs of a FIG trajectory, evaluated every half epoch; 0 skips it "
                             "(default: %(default)s)")
    parser.add_argument("--before", action="store_true",
                        help="add FIG with the sampler defaults before issue 12 (min_steps=0, noise='paper')")
    parser.add_argument("--batch-stop", action="store_true",
                        help="add FIG with the authors' batch-wide stop rule (LangevinSampler(early_stop='batch'): "
                             "all chains stop once their mean confidence > 0.9)")
    parser.add_argument("--authors-count", action="store_true",
                        help="add FIG drawing the authors' max(int(b K), 1) samples per batch (12 for b = 128, 6 for "
                             "b = 64) instead of ceil(b K) (13, 7); with --batch-stop also both together")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, metavar="P",
                        help=f"FIG rows, one per sampler precision {PRECISIONS} (replaces the FIG row; the A/B of "
                             "issue 22: --precision fp32 auto)")
    parser.add_argument("--amp", nargs="+", choices=PRECISIONS, metavar="P",
                        help="with --precision: also FIG rows with the fine-tuning step under bfloat16 autocast "
                             "(FIGTrainer(amp=True); on a CPU only where bfloat16 is native), one per sampler "
                             "precision P (rows 'FIG [P, amp]')")
    parser.add_argument("--no-control", action="store_true", help="skip the CE (k=0) control")
    parser.add_argument("--batch-size", type=int, default=AUTHORS_BATCH, help="ID batch size (default: the authors' "
                        "%(default)s)")
    parser.add_argument("--data", choices=DATA, default=DEFAULT_DATA,
                        help="benchmark (default: %(default)s; 'mnist' / 'fashion-mnist': the full sets, see "
                             "'fastood data fetch'); the SmallCNN is pretrained on its ID training set and cached")
    parser.add_argument("--eval-size", type=int, default=2000,
                        help="full-data benchmarks: evaluate on a seeded subset of this many ID test images and "
                             "images per OOD set (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=int,
                        help="epochs of the pretrained SmallCNN (default: 6 on mnist5k-0to4, 5 on the full sets)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the data split and the pretraining")
    parser.add_argument("--cache", help="cache directory of the pretrained SmallCNN (default: ~/.cache/fastood)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--no-fig", action="store_true", help="skip the FIG row with the defaults")
    parser.add_argument("--no-gs", action="store_true", help="skip the GS baseline")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.amp and not args.precision:
        parser.error("--amp adds rows to the --precision A/B: give --precision too")
    if args.epochs is not None and args.steps is not None:
        parser.error("give --steps or --epochs, not both")
    if args.epochs is None and args.steps is None:
        args.steps = AUTHORS_STEPS
    if (args.epochs is not None and args.epochs < 1) or (args.steps is not None and args.steps < 1) \
            or args.seeds < 1 or args.trajectory_epochs < 0 or args.batch_size < 1 or args.eval_size < 1 \
            or (args.pretrain_epochs is not None and args.pretrain_epochs < 1):
        parser.error("need --epochs >= 1, --steps >= 1, --batch-size >= 1, --seeds >= 1, --eval-size >= 1, "
                     "--pretrain-epochs >= 1 and --trajectory-epochs >= 0")
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)

    t_start = time.time()
    setup = Setup(args)
    reports = {BASE: setup.evaluate(setup.pretrained)}
    probes = {BASE: probe(setup.pretrained, setup.shape)}
    curves, seconds = {}, {}
    rows = methods(args)
    budget = {"steps": args.steps} if args.steps else {"epochs": args.epochs}
    total_steps = args.steps or args.epochs * (len(setup.bench.id_train) // args.batch_size)
    eval_at = sorted({int(v) for v in args.eval_at.split(",") if v.strip()}) if args.eval_at else []
    if any(not 0 < v < total_steps for v in eval_at):
        parser.error(f"--eval-at steps must lie in (0, {total_steps}), got {args.eval_at}")
    mech = {}
    for name, trainer_cls, kwargs in rows:
        for seed in range(args.seeds):
            fresh = {k: copy.deepcopy(v) for k, v in kwargs.items()}  # a fresh sampler per run
            trainer, loader = setup.trainer(trainer_cls, seed, **fresh)
            t0 = time.time()
            for at in eval_at:  # intermediate evaluations of the same run (the run continues from each)
                trainer.fit(loader, steps=at)
                trainer.model.eval()
                label = f"{name} @{at}, seed {seed}"
                reports[label] = evaluate(trainer.detector(), setup.id_test, setup.ood, progress=False)
                mech[label] = mechanism(trainer.history)
                trainer.model.train()
            trainer.fit(loader, **budget)
            label = f"{name}, seed {seed}"
            seconds[label] = time.time() - t0
            trainer.model.eval()
            reports[label] = evaluate(trainer.detector(), setup.id_test, setup.ood, progress=False)
            probes[label] = probe(trainer.model, setup.shape)
            curves[label] = history_summary(trainer.history)
            mech[label] = mechanism(trainer.history)

    base = reports[BASE]
    steps = total_steps
    print(f"SmallCNN on {args.data}, detector MSP (higher score = more OOD); every run fine-tunes "
          f"the same pretrained model for {steps} steps (batch {args.batch_size}, lr {args.lr:g}); metrics in %, "
          f"mean over the OOD sets {list(setup.ood)}")
    print(compare(reports))
    fmt = (lambda v, f: "-" if v is None else format(v, f))
    print("\nPer run: mean AUROC and ID accuracy (%) beside the mechanism figures (means over the run): Langevin "
          "updates per chain (mean, fewest of any chain), confidence of the chains' starts -> of the sampler's output, "
          "and of the generated batch in the training forward")
    width = max(len(k) for k in reports) + 2
    print(f"{'':{width}s}{'AUROC':>8s}{'ID acc':>8s}{'upd/chain':>11s}{'fewest':>8s}{'conf start':>12s}"
          f"{'conf out':>10s}{'gen conf':>10s}")
    print(f"{BASE:{width}s}{100 * base.average['auroc']:8.2f}{100 * base.id_accuracy:8.2f}")
    for label, m in mech.items():
        r = reports[label]
        print(f"{label:{width}s}{100 * r.average['auroc']:8.2f}{100 * r.id_accuracy:8.2f}"
              f"{fmt(m['gen_steps'], '11.2f'):>11s}{fmt(m['fewest_steps'], '8.0f'):>8s}"
              f"{fmt(m['sampler_start_confidence'], '12.4f'):>12s}{fmt(m['sampler_confidence'], '10.4f'):>10s}"
              f"{fmt(m['gen_confidence'], '10.4f'):>10s}")
    summary = {}
    print("\nChange against the pretrained model (mean +- std over seeds, points):")
    std = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    names = [name for name, _, _ in rows]
    names = [f"{name} @{at}" for name in names for at in eval_at] + names
    for name in names:
        runs = [r for k, r in reports.items() if k.startswith(f"{name}, seed ")]
        d_auroc = [100 * (r.average["auroc"] - base.average["auroc"]) for r in runs]
        d_acc = [100 * (r.id_accuracy - base.id_accuracy) for r in runs]
        auroc = [100 * r.average["auroc"] for r in runs]
        summary[name] = {"auroc_mean": statistics.mean(auroc), "auroc_std": std(auroc),
                         "d_auroc_mean": statistics.mean(d_auroc), "d_auroc_std": std(d_auroc),
                         "d_acc_mean": statistics.mean(d_acc), "d_acc_std": std(d_acc),
                         "worst_d_acc": min(d_acc), "runs_with_higher_auroc": sum(d > 0 for d in d_auroc),
                         "runs": len(runs)}
        s = summary[name]
        print(f"  {name:14s} AUROC {s['auroc_mean']:.2f} +- {s['auroc_std']:.2f} (change {s['d_auroc_mean']:+.2f} "
              f"+- {s['d_auroc_std']:.2f})   ID accuracy {s['d_acc_mean']:+.2f} +- {s['d_acc_std']:.2f} (worst "
              f"{s['worst_d_acc']:+.2f})   AUROC higher in {s['runs_with_higher_auroc']}/{s['runs']} runs")

    print("\nAUROC per OOD set (%):")
    width = max(len(k) for k in reports) + 2
    print(f"{'':{width}s}" + "".join(f"{k:>14s}" for k in setup.ood))
    for label, r in reports.items():
        print(f"{label:{width}s}" + "".join(f"{100 * r.metrics[k]['auroc']:14.1f}" for k in setup.ood))

    print("\nGenerated samples. Probe: 256 Langevin chains, 20 steps from uniform noise, no early stop "
          "('noise' = the uniform starts):")
    print(f"{'':{width}s}{'noise conf':>12s}{'LDS conf':>12s}{'LDS energy':>12s}")
    for label, p in probes.items():
        print(f"{label:{width}s}{p['noise_confidence']:12.4f}{p['langevin_confidence']:12.4f}"
              f"{p['langevin_energy']:12.2f}")
    print("Training history (mean of the first -> last 10 steps):")
    for label, c in curves.items():
        print(f"  {label}: " + ", ".join(f"{k} {v['first']:.4g} -> {v['last']:.4g}" for k, v in c.items()))

    traj = []
    if args.trajectory_epochs:
        traj = trajectory(setup, args.trajectory_epochs)
        print("\nFIG trajectory (seed 0), evaluated every half epoch; mean AUROC and ID accuracy in %, the generated "
              "samples' mean confidence and Langevin steps over the preceding steps:")
        print(f"{'step':>6s}{'AUROC':>9s}{'ID acc':>9s}{'gen conf':>11s}{'LDS conf':>11s}{'LDS steps':>11s}")
        for row in traj:
            print(f"{row['step']:6d}{100 * row['auroc']:9.2f}{100 * row['id_accuracy']:9.2f}"
                  f"{row['gen_confidence']:11.4f}{row['sampler_confidence']:11.4f}{row['gen_steps']:11.2f}")
    total = time.time() - t_start
    print(f"\ntime: fine-tuning runs {sum(seconds.values()):.0f} s; total {total:.0f} s")

    if args.json:
        out = {"benchmark": args.data, "epochs": args.epochs, "steps": steps, "seeds": args.seeds, "lr": args.lr,
               "args": vars(args),
               "seconds": seconds, "reports": {k: r.to_dict() for k, r in reports.items()}, "summary": summary,
               "mechanism": mech, "probes": probes, "history": curves, "trajectory": traj}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return reports


if __name__ == "__main__":
    main()
