"""Every detector on the standard and the FIG-fine-tuned network (FIG's Table 1 layout), and CMG-energy fine-tuning
scored with ReAct (CMG's Table 2 layout), on a real benchmark; hyperparameters tuned on validation data.

    python bench/detectors_table.py [--data fashion-mnist] [--out runs/detectors-table] [--quick]
        [--width 32] [--pretrain-epochs 6] [--fig-steps 1000] [--cmg-epochs 10] [--cvae-epochs 10]
        [--train-limit N] [--fit-limit N] [--eval-n 2000] [--val-n 1000] [--detectors LIST] [--grids paper|small]
        [--networks standard,fig] [--no-cmg] [--cached-only] [--seed 0] [--device auto] [--cache DIR] [--quiet]

Networks (the demo's method registry, :data:`fastood.demo.METHODS`, and its cached pretraining):

- ``standard``: SmallCNN trained with cross-entropy (``fastood.demo.Context.pretrained``, cached).
- ``fig``: that network fine-tuned by FIG (Algorithm 2, ``FIGTrainer`` with the paper's defaults, built by
  ``METHODS["fig"]``) for ``--fig-steps`` optimizer steps (default 1000 = the authors' budget, at batch 64).
- ``cmg-energy``: CMG stage 2 (energy mode, ``METHODS["cmg-energy"]``) on the standard network for ``--cmg-epochs``.

Every detector of :data:`fastood.detectors.DETECTORS` that a plain classifier supports (the method-specific ones --
two-head discrepancy, the n+1 classes' extraclass / maxidprobability, ICE's Gaussian head -- need their own trainers
and are listed as skipped) is built, fitted on the ID training data where it needs it, tuned, and evaluated:

- Tuning grids (FIG, Sec. V-A): ODIN T in {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000} x epsilon in 21 values in
  [0, 0.004]; MLB (Mahalanobis on every ReLU output, the layers' distances added without the paper's logistic
  regression) noise in {0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2}; DRF noise in {0.0025,
  0.05}; GM with orders 1..10 (no search); every other detector over its class's ``grid`` / ``tuning_grid``.
  Noise magnitudes are in pixel units ([0, 1] images, as the papers' code divides the step by the normalization std):
  the benchmarks' inputs are ``(p - 0.5) / 0.5``, so the step in input units is twice the listed value.
- Selection: the best AUROC on a *validation* split -- ``--val-n`` held-out ID test images (disjoint from the
  ``--eval-n`` ID test images that are scored) against as many generated auxiliary outliers (half ``blobs``, half
  ``strokes``; :func:`fastood.data.auxiliary_outliers`, disjoint from every test OOD set). The papers report, per
  OOD set, the best value over their grid as measured on that OOD set itself ("best reported"): an upper bound that
  uses the test distribution. The numbers here never see the test OOD sets (expect them lower), as a user's would not.
- Reported: AUROC per OOD set, mean AUROC, mean FPR95 (FPR on OOD at 95% TPR on ID), ID accuracy, FIG's improvement
  over the standard network per detector, the chosen hyperparameters, the fit time (the fit behind the chosen
  detector), the size of the fitted state, and scoring speed (test images / s over the ID and OOD test subsets,
  fwd + any input perturbation, on this machine's ``--device``).

``--quick``: ``mnist5k-0to4``, a width-8 SmallCNN, 1000 training images, 3 epochs of pretraining, 3 FIG steps (Langevin
chains of at most 5 updates, the demo's ``--tiny``), 1 CMG epoch, detectors fitted on 256 images (DRF's flows for 2
epochs), 48 images per set and the ``small`` grids (each axis thinned to its first and last value): a smoke run of
every code path in about a minute of CPU time (tests/test_detectors_table.py). The numbers mean nothing.

Cells (one per network x detector) are cached under ``--out/cells`` (resumable: a second run with the same settings
recomputes nothing); networks under ``--out/models``, the pretraining and CVAE in ``--cache``. Writes
``--out/detectors_table.{md,txt,json,csv}``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastood import demo  # noqa: E402
from fastood.data import auxiliary_outliers  # noqa: E402
from fastood.detectors import DETECTORS  # noqa: E402
from fastood.detectors.tuning import tune_fitted  # noqa: E402
from fastood.evaluation import evaluate  # noqa: E402
from fastood.protocol import Cells, cached_model  # noqa: E402

#: detectors that need a model trained by their own method (not a plain classifier's logits / features)
METHOD_SPECIFIC = {"discrepancy": "a two-head model (DiscrepancyTrainer)",
                   "extraclass": "an n+1-class model (ManifoldTrainer / CMG-softmax)",
                   "maxidprobability": "an n+1-class model (ManifoldTrainer)",
                   "ice": "a Gaussian head (ICETrainer)"}
PIXEL_STD = 0.5  # the benchmarks' images are (p - 0.5) / 0.5: a pixel-unit step e is e / 0.5 in input units
ODIN_T = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
ODIN_EPSILON = [round(0.004 * i / 20, 6) for i in range(21)]
MLB_NOISE = [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2]
DRF_NOISE = [0.0025, 0.05]
PIXEL_UNITS = ("mahalanobis", "drf")  # epsilon given in pixel units, converted for the detector
NETWORKS = ("standard", "fig")
VALIDATION_OUTLIERS = ("blobs", "strokes")


# ----------------------------------------------------------------------------------------------- settings
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist", help="benchmark (fastood.data.benchmark; default %(default)s)")
    p.add_argument("--out", default=os.path.join("runs", "detectors-table"), help="output folder (cells, tables)")
    p.add_argument("--quick", action="store_true", help="the tiny mnist5k-0to4 smoke run (numbers mean nothing)")
    p.add_argument("--width", type=int, default=32, help="SmallCNN width (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch (default %(default)s)")
    p.add_argument("--pretrain-epochs", type=int, default=6, help="cross-entropy pretraining (default %(default)s)")
    p.add_argument("--fig-steps", type=int, default=1000, help="FIG fine-tuning steps (default: the authors' 1000)")
    p.add_argument("--cmg-epochs", type=int, default=10, help="CMG-energy stage-2 epochs (default %(default)s)")
    p.add_argument("--cvae-epochs", type=int, default=10, help="CMG's CVAE epochs (default %(default)s)")
    p.add_argument("--train-limit", type=int, default=None, help="train the networks on this many ID images")
    p.add_argument("--fit-limit", type=int, default=None,
                   help="fit the detectors on this many ID training images (seeded subset; default: all)")
    p.add_argument("--eval-n", type=int, default=2000, help="images per test set (seeded subsets)")
    p.add_argument("--val-n", type=int, default=1000, help="held-out ID images and validation outliers for tuning")
    p.add_argument("--detectors", default="all", help="comma-separated registry names, or all (default)")
    p.add_argument("--grids", choices=("paper", "small"), default=None,
                   help="paper (default) or small (every axis thinned to its first and last value; --quick's default)")
    p.add_argument("--networks", default="standard,fig",
                   help="networks of the FIG table: standard,fig (default), or one of them (e.g. a second process "
                        "filling other cells of the same --out)")
    p.add_argument("--no-cmg", dest="cmg", action="store_false", help="skip the CMG-energy + ReAct table")
    p.add_argument("--cached-only", action="store_true",
                   help="write the tables from the cells already computed (e.g. by a run still going); compute nothing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache", default=None,
                   help="pretraining / CVAE cache (default: $FASTOOD_CACHE or ~/.cache/fastood)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.width, args.pretrain_epochs, args.fig_steps = "mnist5k-0to4", 8, 3, 3
        args.cmg_epochs, args.cvae_epochs = 1, 1
        args.train_limit = args.train_limit or 1000
        args.fit_limit = args.fit_limit or 256
        args.eval_n, args.val_n = min(args.eval_n, 48), min(args.val_n, 48)
    args.grids = args.grids or ("small" if args.quick else "paper")
    for name in ("width", "batch_size", "pretrain_epochs", "fig_steps", "cmg_epochs", "cvae_epochs", "eval_n",
                 "val_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    names = list(DETECTORS) if args.detectors == "all" else [d.strip().lower() for d in args.detectors.split(",")]
    unknown = [d for d in names if d not in DETECTORS]
    if unknown or not names:
        p.error(f"--detectors: unknown {unknown or args.detectors!r}; valid: all, {', '.join(DETECTORS)}")
    args.detector_names = names
    args.network_names = [n.strip() for n in args.networks.split(",") if n.strip()]
    if not args.network_names or any(n not in NETWORKS for n in args.network_names):
        p.error(f"--networks: expected a comma-separated list of {', '.join(NETWORKS)}, got {args.networks!r}")
    return args


def settings_tag(args) -> str:
    """A short hash of everything a cell depends on (cells of other settings are never reused)."""
    keys = ("data", "width", "batch_size", "pretrain_epochs", "fig_steps", "cmg_epochs", "cvae_epochs", "train_limit",
            "fit_limit", "eval_n", "val_n", "grids", "seed")
    text = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def thin(values):
    """First and last value (the ``small`` grids)."""
    values = list(values)
    return values if len(values) <= 2 else [values[0], values[-1]]


# ----------------------------------------------------------------------------------------------- networks
def relu_layers(model: nn.Module) -> list:
    """Names of every ReLU module: the blocks' outputs MLB reads (plus the penultimate ReLU of SmallCNN)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]


def build_detector(name: str, model: nn.Module, quick: bool = False):
    """The registry's detector with the table's layer choices: MLB = Mahalanobis on every ReLU output, ODIN with its
    epsilon in pixel units (``std=0.5``); ``quick``: DRF's flows trained for 2 epochs instead of 20."""
    cls = DETECTORS[name]
    if name == "drf" and quick:
        return cls(model, epochs=2)
    if name == "odin":
        return cls(model, std=PIXEL_STD)
    if name == "mahalanobis":
        layers = relu_layers(model)
        return cls(model, layers=layers or None)
    return cls(model)


def grid_for(name: str, det, num_classes: int, small: bool, fit_size: int = None):
    """The tuning grid (pixel units for noise magnitudes), or None for a detector without hyperparameters."""
    if name == "odin":
        grid = {"T": ODIN_T, "epsilon": ODIN_EPSILON}
    elif name == "mahalanobis":
        grid = {"epsilon": MLB_NOISE}
    elif name == "drf":
        grid = {"epsilon": DRF_NOISE}
    elif name == "gm":
        return None  # the paper's orders 1..10, no search (GM.replace refuses a new orders list)
    else:
        grid = getattr(det, "grid", None) or getattr(det, "tuning_grid", None)
        if not grid:
            return None
        grid = {k: list(v) for k, v in grid.items()}
        if name == "gen" and "M" in grid:  # M >= number of classes all mean "every class"
            grid["M"] = sorted({min(int(m), num_classes) for m in grid["M"]})
        if name == "knn" and "k" in grid and fit_size is not None:  # k beyond the bank has no k-th neighbour
            grid["k"] = [k for k in grid["k"] if k <= fit_size] or [1]
    return {k: thin(v) for k, v in grid.items()} if small else grid


def to_input_units(name: str):
    if name not in PIXEL_UNITS:
        return None
    return lambda params: {k: (v / PIXEL_STD if k == "epsilon" else v) for k, v in params.items()}


def state_bytes(det) -> int:
    """Bytes of the tensors a fitted detector holds beyond the model (statistics, banks, flows)."""
    model = det.model
    owned = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    owned |= {id(m) for m in model.modules()}
    seen, total = set(), 0

    def visit(value, depth=0):
        nonlocal total
        if depth > 4 or id(value) in seen or id(value) in owned:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, nn.Module):
            for t in list(value.parameters()) + list(value.buffers()):
                visit(t, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth + 1)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth + 1)

    for key, value in vars(det).items():
        if key != "model":
            visit(value)
    return total


class Table:
    """Data, networks and cells of one run."""

    def __init__(self, args):
        self.args = args
        self.say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
        self.cells = Cells(args.out)
        self.tag = settings_tag(args)
        config = demo.RunConfig(methods=["fig"], data=args.data, width=args.width, batch_size=args.batch_size,
                                pretrain_epochs=args.pretrain_epochs, cvae_epochs=args.cvae_epochs,
                                train_limit=args.train_limit, seed=args.seed, device=args.device, cache=args.cache,
                                out=os.path.join(args.out, f"training-{self.tag}"),  # resumable checkpoints
                                quiet=args.quiet, plots=False)
        # --quick: the demo's --tiny Langevin chains (at most 5 updates) for FIG; set after construction because
        # RunConfig(tiny=True) would also cut the pretraining to 1 epoch.
        config.tiny = args.quick
        self.ctx = demo.Context(config)
        bench = self.ctx.bench
        self.num_classes = bench.num_classes
        g = torch.Generator().manual_seed(args.seed + 17)
        order = torch.randperm(len(bench.id_test), generator=g).tolist()
        val_n = min(args.val_n, len(order) // 2)
        self.id_val = DataLoader(Subset(bench.id_test, order[:val_n]), batch_size=256)
        id_eval = Subset(bench.id_test, order[val_n:val_n + args.eval_n])
        self.id_eval = DataLoader(id_eval, batch_size=256)
        self.ood_eval = {}
        for name, ds in bench.ood.items():
            keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed + 29))[:args.eval_n]
            self.ood_eval[name] = DataLoader(Subset(ds, keep.tolist()), batch_size=256)
        per = [val_n // len(VALIDATION_OUTLIERS)] * len(VALIDATION_OUTLIERS)
        per[0] += val_n - sum(per)
        outliers = [auxiliary_outliers(kind, n=n, shape=bench.shape, seed=args.seed + 300 + i)
                    for i, (kind, n) in enumerate(zip(VALIDATION_OUTLIERS, per))]
        self.ood_val = DataLoader(ConcatDataset(outliers), batch_size=256)
        fit_set = bench.id_train
        if args.fit_limit is not None and args.fit_limit < len(fit_set):
            keep = torch.randperm(len(fit_set), generator=torch.Generator().manual_seed(args.seed + 41))
            fit_set = Subset(fit_set, keep[:args.fit_limit].tolist())
        self.fit_loader = DataLoader(fit_set, batch_size=256)
        self.sizes = {"id_train (networks)": len(bench.id_train), "id_train (detector fits)": len(fit_set),
                      "id_val": val_n, "val_outliers": sum(per), "id_test": len(id_eval),
                      **{f"ood {k}": len(v.dataset) for k, v in self.ood_eval.items()}}
        self._networks = {}

    # ------------------------------------------------------------------ networks
    def network(self, name: str) -> nn.Module:
        if name not in self._networks:
            self._networks[name] = self._build(name).eval()
        return self._networks[name]

    def _build(self, name: str) -> nn.Module:
        ctx, args = self.ctx, self.args
        if name == "standard":
            return ctx.pretrained()
        from fastood import distributed as D

        ctx.pretrained()
        budget = {"fig": {"steps": args.fig_steps}, "cmg-energy": {"epochs": args.cmg_epochs}}[name]
        D.seed_everything(args.seed)
        built = demo.METHODS[name].build(ctx)  # the demo's trainer with the paper's defaults
        key = (f"{name}-{args.data}-w{args.width}-e{args.pretrain_epochs}-n{args.train_limit}-b{args.batch_size}"
               f"-{'-'.join(f'{k}{v}' for k, v in budget.items())}-s{args.seed}")

        def train(_model):
            self.say(f"training {name} ({budget}) ...")
            D.seed_everything(args.seed)
            t0 = time.perf_counter()
            built.trainer.fit(ctx.train_loader, **budget)
            self.say(f"  {name}: {time.perf_counter() - t0:.0f} s")

        return cached_model(self.cells, key, built.model, train, log=self.say)

    # ------------------------------------------------------------------ cells
    def cell(self, network: str, detector: str):
        """The cached cell, else computed (None with ``--cached-only``)."""
        key = f"{self.tag}-{network}-{detector}"
        if self.args.cached_only:
            return self.cells.get(key)
        return self.cells.run(key, lambda: self._compute(network, detector), log=self.say)

    def _compute(self, network: str, name: str) -> dict:
        args = self.args
        model = self.network(network)
        self.say(f"{network} / {name} ...")
        det = build_detector(name, model, args.quick)
        grid = grid_for(name, det, self.num_classes, args.grids == "small", len(self.fit_loader.dataset))
        t0 = time.perf_counter()
        if grid is None:
            fit_s = 0.0
            if _fit_overridden(type(det)):
                t1 = time.perf_counter()
                det.fit(self.fit_loader)
                fit_s = time.perf_counter() - t1
            params, results, val = {}, [], None
        else:
            det, params, results, fit_s = tune_fitted(det, grid, self.id_val, self.ood_val, fit_loader=self.fit_loader,
                                                      convert=to_input_units(name))
            val = next(m for p, m in results if p == params)
        tune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = evaluate(det, self.id_eval, self.ood_eval, progress=False)
        score_s = time.perf_counter() - t0
        images = sum(self.sizes[k] for k in self.sizes if k == "id_test" or k.startswith("ood "))
        return {"network": network, "detector": name, "name": det.name, "params": params,
                "grid": grid, "grid_points": len(results), "validation": val,
                "test": report.metrics, "mean": report.average, "id_accuracy": report.id_accuracy,
                "fit_s": round(fit_s, 3), "tune_s": round(tune_s, 3), "score_images_per_s": round(images / score_s, 1),
                "state_bytes": state_bytes(det)}


def _fit_overridden(cls) -> bool:
    from fastood.detectors import Detector

    return cls.fit is not Detector.fit


# ----------------------------------------------------------------------------------------------- tables
def _pct(v, digits=1):
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.{digits}f}"


def _params(cell):
    p = cell.get("params") or {}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()) or "defaults"


def fig_table(cells: dict, detectors, ood_sets) -> list:
    """Markdown lines: FIG's Table 1 layout (AUROC per OOD set standard / FIG, mean, FPR95, improvement)."""
    head = ["detector"] + [f"{s} AUROC std / FIG" for s in ood_sets] + [
        "mean AUROC std / FIG", "improvement", "FPR95 std / FIG", "ID acc std / FIG"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in detectors:
        a, b = cells.get(("standard", d)), cells.get(("fig", d))
        if a is None and b is None:
            continue
        first = a or b
        row = [first["name"].split("(")[0] if d != "mahalanobis" else "MLB (Mahalanobis, every ReLU)"]

        def pair(get):
            return " / ".join("-" if c is None else _pct(get(c)) for c in (a, b))

        row += [pair(lambda c: c["test"][s]["auroc"]) for s in ood_sets]
        gain = "-" if a is None or b is None else f"{100 * (b['mean']['auroc'] - a['mean']['auroc']):+.1f}"
        row += [pair(lambda c: c["mean"]["auroc"]), gain, pair(lambda c: c["mean"]["fpr95"]),
                pair(lambda c: c["id_accuracy"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def cmg_table(rows: dict, ood_sets) -> list:
    """Markdown lines: CMG's Table 2 layout (ReAct alone vs CMG-energy fine-tuned + ReAct): FPR95 and AUROC."""
    head = ["method"] + [f"{s} FPR95 / AUROC" for s in ood_sets] + ["mean FPR95 / AUROC", "ID acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, c in rows.items():
        row = [label] + [f"{_pct(c['test'][s]['fpr95'])} / {_pct(c['test'][s]['auroc'])}" for s in ood_sets]
        row += [f"{_pct(c['mean']['fpr95'])} / {_pct(c['mean']['auroc'])}", _pct(c["id_accuracy"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def cost_table(cells: dict, detectors) -> list:
    head = ["detector", "params std / FIG (validation-tuned)", "grid points", "fit s (std)", "state KiB",
            "score images/s (std)", "tuning s std / FIG"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in detectors:
        a, b = cells.get(("standard", d)), cells.get(("fig", d))
        if a is None:
            continue
        lines.append("| " + " | ".join([
            d, f"{_params(a)} / {_params(b) if b else '-'}", str(a["grid_points"]), f"{a['fit_s']:.2f}",
            f"{a['state_bytes'] / 1024:.1f}", f"{a['score_images_per_s']:.0f}",
            f"{a['tune_s']:.1f} / {b['tune_s']:.1f}" if b else f"{a['tune_s']:.1f} / -"]) + " |")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    table = Table(args)
    skipped = {d: f"needs {METHOD_SPECIFIC[d]}" for d in args.detector_names if d in METHOD_SPECIFIC}
    detectors = [d for d in args.detector_names if d not in METHOD_SPECIFIC]
    cells, missing = {}, []
    for network in args.network_names:
        for d in detectors:
            try:
                cell = table.cell(network, d)
            except (TypeError, ValueError) as err:  # a detector that does not apply to this model
                skipped[d] = f"{type(err).__name__}: {err}"
                table.say(f"  skipped {network} / {d}: {skipped[d]}")
                continue
            if cell is None:
                missing.append(f"{network}/{d}")
            else:
                cells[(network, d)] = cell
    ood_sets = list(table.ood_eval)
    cmg_rows, cmg_note = {}, None
    if not args.cmg:
        cmg_note = "skipped (--no-cmg)"
    elif "react" not in DETECTORS:
        cmg_note = ("skipped: ReAct is not in fastood.detectors.DETECTORS on this checkout (it comes with the det-a "
                    "branch); rerun once it is merged")
    else:
        react_std = cells.get(("standard", "react")) or table.cell("standard", "react")
        cmg_energy = table.cell("cmg-energy", "react")
        own = table.cell("cmg-energy", "energy")
        cmg_rows = {"ReAct (standard network)": react_std, "CMG-energy fine-tuned, scored with ReAct": cmg_energy,
                    "CMG-energy fine-tuned, energy (its own detector)": own}
        missing += [f"CMG table: {k}" for k, v in cmg_rows.items() if v is None]
        cmg_rows = {k: v for k, v in cmg_rows.items() if v is not None}
    total_s = time.perf_counter() - start
    command = "python bench/detectors_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("detector_names", "network_names")}
    meta = {"command": command.strip(), "settings": settings,
            "settings_tag": table.tag, "sizes": table.sizes, "device": str(table.ctx.device),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "total_s": round(total_s, 1), "skipped": skipped, "cmg_note": cmg_note, "not_computed": missing}
    write_outputs(args.out, meta, cells, cmg_rows, detectors, ood_sets)
    table.ctx.close()
    return {"meta": meta, "cells": cells, "cmg": cmg_rows, "table": table}


TUNING_NOTE = ("Hyperparameters: chosen by the best AUROC on a validation split (held-out ID test images vs generated "
               "blobs/strokes outliers), never on the test OOD sets. The papers (FIG Table 1 after Lee et al. / "
               "Liang et al.) report, per OOD set, the best grid point measured on that OOD set itself (\"best "
               "reported\"), an upper bound that sees the test distribution; these numbers are what a user who "
               "cannot see the OOD data gets. Noise magnitudes are in pixel units ([0, 1] images).")


def write_outputs(out, meta, cells, cmg_rows, detectors, ood_sets):
    os.makedirs(out, exist_ok=True)
    md = [f"# Detectors on the standard and FIG-fine-tuned networks ({meta['settings']['data']})", ""]
    md += [f"- command: `{meta['command']}`", f"- sizes: {meta['sizes']}", f"- device: {meta['device']} "
           f"(torch {meta['torch']}, {meta['threads']} threads), total {meta['total_s']:.0f} s", ""]
    md += ["## FIG Table 1 layout: AUROC (%) per OOD set, standard / FIG-fine-tuned network", ""]
    md += fig_table(cells, detectors, ood_sets)
    md += ["", TUNING_NOTE, ""]
    md += ["## CMG Table 2 layout: ReAct vs CMG-energy fine-tuning scored with ReAct (FPR95 / AUROC, %)", ""]
    md += cmg_table(cmg_rows, ood_sets) if cmg_rows else [meta["cmg_note"] or "(not run)"]
    md += ["", "## Cost and chosen hyperparameters", ""]
    md += cost_table(cells, detectors)
    md += ["", "fit s = the ID-data fit behind the chosen detector; state = the fitted tensors beyond the model; "
           "images/s = the test pass (ID + OOD subsets) on the device above."]
    if meta["not_computed"]:
        md += ["", "Not computed yet (--cached-only): " + ", ".join(meta["not_computed"])]
    if meta["skipped"]:
        md += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items())]
    text = "\n".join(md) + "\n"
    for ext in ("md", "txt"):
        with open(os.path.join(out, f"detectors_table.{ext}"), "w") as fh:
            fh.write(text)
    payload = {"meta": meta, "cells": [dict(v, network=k[0]) for k, v in cells.items()],
               "cmg_table2": {k: v for k, v in cmg_rows.items()}}
    with open(os.path.join(out, "detectors_table.json"), "w") as fh:
        json.dump(payload, fh, indent=1)
    with open(os.path.join(out, "detectors_table.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["table", "network", "detector", "name", "params", "ood_set", "auroc", "fpr95", "aupr_in",
                    "aupr_out", "id_accuracy", "fit_s", "score_images_per_s", "state_bytes"])
        rows = [("fig_table1", k[0], k[1], v) for k, v in cells.items()]
        rows += [("cmg_table2", label, v["detector"], v) for label, v in cmg_rows.items()]
        for table_name, network, d, c in rows:
            for s, m in list(c["test"].items()) + [("mean", c["mean"])]:
                w.writerow([table_name, network, d, c["name"], json.dumps(c["params"]), s, m["auroc"], m["fpr95"],
                            m["aupr_in"], m["aupr_out"], c["id_accuracy"], c["fit_s"], c["score_images_per_s"],
                            c["state_bytes"]])
    if not meta["settings"]["quiet"]:
        print(text)


if __name__ == "__main__":
    main()
