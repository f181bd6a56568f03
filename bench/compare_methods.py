"""Every trainer of fastood on one real benchmark under one protocol -- a table no paper has.

    python bench/compare_methods.py [--data fashion-mnist] [--seeds 0 1 2] [--steps 1000] [--methods all]
        [--eval-n 2000] [--out runs/compare] [--set METHOD.KEY=VALUE ...] [--quick] [--quiet]

Protocol (the same for every method; the registry and the run context are fastood.demo's, so these are exactly
the methods and budgets ``fastood demo`` / ``fastood train`` run):
- per seed, one cross-entropy pretrained SmallCNN (``--pretrain-epochs``, cached) that every fine-tuning method
  starts from; ``standard`` is that network trained further for the same budget (the control);
- every method for ``--steps`` optimizer steps of ``--batch-size`` ID images with its defaults (the paper's
  recipe; the auxiliary outliers of OE / Energy-OE / ICE and the two-head's unlabeled data are fastood.demo's:
  generated "blobs", disjoint from every test set);
- evaluation: ``--eval-n`` images of the ID test set and of each OOD set (seeded subsets), with the method's own
  detector and MSP / Energy; ID accuracy on the same ID images.
Columns: mean AUROC per OOD set and over the sets, FPR95, ID accuracy (mean +- std over seeds), the change of the
mean AUROC and of ID accuracy against the pretrained network's MSP, wall time of the training, and the method's
mechanism telemetry (its logged figures, averaged over the last 10% of its steps).

Ablations: ``--set manifold.freeze_bn=True`` passes a keyword argument to one method's trainer (as ``fastood train
manifold --set freeze_bn=True`` does); such a method is cached and reported as its own variant,
``manifold[freeze_bn=True]``, beside the default rows already cached under the same ``--out``.

Each (seed, method) cell is cached under ``--out``/cells and each training checkpoints (and saves its model) under
``--out``/<data>_st<steps>_b<batch>_n<eval>_t<train-n>/s<seed>/<method>: an interrupted run continues, and runs of
another budget under the same ``--out`` get their own folders. Writes ``--out``/compare_methods.{txt,md,json,csv}
and, with matplotlib, compare_methods.png.

Stale cells: each cell records its trainer's hyperparameters (the constructor arguments, defaults included;
``fastood._hyperparameters``). Before a cached cell is reused, the method's trainer is built as it would be today
(nothing trained); when a default changed since the cell was made (a newer fastood), the script says which and
trains the method again under a key and folder of its own (``..._h<digest>``), so an upgraded fastood never reports
the old defaults' results under the method's name. It sees constructor arguments only, not a change inside the
code; cells made before they recorded hyperparameters are reused as they are.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastood.demo import (METHODS, Context, RunConfig, evaluate_rows, method_rows, train_method,  # noqa: E402
                          make_detector)
from fastood.options import parse_trainer_option  # noqa: E402
from fastood.protocol import format_mean_std, mean_std, open_run, pyplot  # noqa: E402


def _report_dict(report) -> dict:
    return {"detector": report.detector, "id_accuracy": report.id_accuracy,
            "auroc": {k: 100 * v["auroc"] for k, v in report.metrics.items()},
            "fpr95": {k: 100 * v["fpr95"] for k, v in report.metrics.items()},
            "mean_auroc": 100 * report.average["auroc"], "mean_fpr95": 100 * report.average["fpr95"]}


def _telemetry(history, fraction=0.1) -> dict:
    """The mean of every logged figure over the last ``fraction`` of the steps (NaN entries skipped)."""
    if not history:
        return {}
    tail = history[-max(1, int(len(history) * fraction)):]
    out = {}
    for key in tail[-1]:
        values = [float(h[key]) for h in tail if key in h and isinstance(h[key], (int, float))
                  and math.isfinite(float(h[key]))]
        if values and key not in ("step", "epoch"):
            out[key] = sum(values) / len(values)
    return out


def variant(method, options) -> str:
    """The name of a method run with trainer options: ``manifold[beta_range='authors',freeze_bn=True]``."""
    if not options:
        return method
    return method + "[" + ",".join(f"{k}={v!r}" for k, v in sorted(options.items())) + "]"


def _folder(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def parse_sets(items, methods) -> dict:
    """``["manifold.freeze_bn=True", ...]`` -> ``{"manifold": {"freeze_bn": True}, ...}``."""
    out = {}
    for item in items or []:
        method, dot, option = item.partition(".")
        if not dot or method not in METHODS:
            raise ValueError(f"--set must be METHOD.KEY=VALUE with METHOD one of {', '.join(METHODS)}, got {item!r}")
        if method not in methods:
            raise ValueError(f"--set {item!r}: method {method!r} is not among --methods {methods}")
        key, value = parse_trainer_option(option)
        out.setdefault(method, {})[key] = value
    return out


def run_tag(args) -> str:
    """What the training and evaluation of a cell depend on besides seed and method: the cells' key prefix and the
    folder of the run's checkpoints and models (two budgets under one ``--out`` never share a checkpoint)."""
    return f"{args.data}_st{args.steps}_b{args.batch_size}_n{args.eval_n}_t{args.train_n}"


def _config(args, seed, method, suffix=""):
    options = args.options.get(method, {})
    return RunConfig(methods=[method], data=args.data, seed=seed, steps=args.steps, batch_size=args.batch_size,
                     eval_limit=args.eval_n,
                     out=os.path.join(args.out, run_tag(args), f"s{seed}", _folder(variant(method, options)) + suffix),
                     resume=True, quiet=args.quiet, plots=False, pretrain_epochs=args.pretrain_epochs,
                     cvae_epochs=args.cvae_epochs, train_limit=args.train_n, cache=args.cache,
                     trainer_options=dict(options))


def baseline_cell(args, seed):
    ctx = Context(_config(args, seed, "standard"))
    try:
        t0 = time.perf_counter()
        base = ctx.pretrained()
        pretrain_s = time.perf_counter() - t0
        rows = evaluate_rows(ctx, {"msp": make_detector("msp", base), "energy": make_detector("energy", base)})
        return {"seed": seed, "pretrain_s": pretrain_s, "rows": {k: _report_dict(v) for k, v in rows.items()}}
    finally:
        ctx.close()


def _plain(record: dict) -> dict:
    """A hyperparameter record as JSON gives it back (tuples -> lists), so a stored and a fresh one compare."""
    return json.loads(json.dumps(record, sort_keys=True, default=repr))


def trainer_record(args, seed, method) -> dict:
    """The hyperparameters ``method``'s trainer is built with today for this seed (``--set`` options included):
    the trainer is built, nothing is trained."""
    ctx = Context(_config(args, seed, method))
    try:
        return _plain(METHODS[method].build(ctx).trainer.hyperparameters)
    finally:
        ctx.close()


def record_digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:8]


def changed_hyperparameters(stored: dict, now: dict) -> list:
    """``["name: old -> new", ...]`` for every hyperparameter that differs (absent on one side: ``None``)."""
    return [f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]


def run_method_cell(cells, key, args, seed, method, log):
    """The (seed, method) cell: the cached one unless its trainer's hyperparameters differ from today's, else
    trained (again, under ``key_h<digest>`` and a folder of its own when the cached one is stale)."""
    cached = cells.get(key)
    suffix = ""
    if cached is not None:
        stored = cached.get("hyperparameters")
        now = None if stored is None else trainer_record(args, seed, method)
        if stored is None or stored == now:
            log(f"[cached] {key}")
            return cached
        suffix = f"_h{record_digest(now)}"
        log(f"{key}: the trainer's defaults changed since this cell was made ("
            + "; ".join(changed_hyperparameters(stored, now)) + f"): training it again as {key}{suffix}")
    return cells.run(key + suffix, lambda: method_cell(args, seed, method, suffix), log)


def method_cell(args, seed, method, suffix=""):
    ctx = Context(_config(args, seed, method, suffix))
    try:
        t0 = time.perf_counter()
        built, own = train_method(ctx, method, os.path.join(ctx.config.out, "model.pt"))
        train_s = time.perf_counter() - t0
        reports = evaluate_rows(ctx, method_rows(ctx, method, built, own))
        first = next(iter(reports))
        return {"seed": seed, "method": variant(method, args.options.get(method)), "train_s": train_s, "own": first,
                "rows": {k: _report_dict(v) for k, v in reports.items()},
                "telemetry": _telemetry(getattr(built.trainer, "history", [])),
                "hyperparameters": _plain(built.trainer.hyperparameters)}
    finally:
        ctx.close()


def _plus_minus(values, signed=False) -> str:
    """``"89.0 ± 1.5"`` (``"+19.6 ± 10.2"`` when ``signed``), ``"-"`` for no finite value."""
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "-"
    return (f"{m:+.1f}" if signed else f"{m:.1f}") + f" ± {s:.1f}"


def table(base, cells, methods, oods, markdown=False):
    """One row per method (its own detector), means over seeds: aligned text with ``(n=seeds)``, or a markdown
    table (``markdown=True``, mean ± std) as docs/reproduction.md shows it."""
    def cell(values, signed=False):
        return _plus_minus(values, signed) if markdown else format_mean_std(values)

    head = (["method / detector"] + [f"AUROC {o}" for o in oods]
            + ["mean AUROC", "change", "FPR95", "ID acc", "acc change", "train s", "telemetry (last 10%)"])
    rows = []
    msp = [b["rows"]["msp"] for b in base]
    base_auroc = [r["mean_auroc"] for r in msp]
    base_acc = [100 * r["id_accuracy"] for r in msp]
    rows.append(["pretrained / MSP"] + [cell([r["auroc"][o] for r in msp]) for o in oods]
                + [cell(base_auroc), "", cell([r["mean_fpr95"] for r in msp]),
                   cell(base_acc), "", "", ""])
    for m in methods:
        got = [c for c in cells if c["method"] == m]
        if not got:
            rows.append([m] + ["not run"] * (len(head) - 1))
            continue
        own = [c["rows"][c["own"]] for c in got]
        seeds = [c["seed"] for c in got]
        b_auroc = {b["seed"]: b["rows"]["msp"]["mean_auroc"] for b in base}
        b_acc = {b["seed"]: 100 * b["rows"]["msp"]["id_accuracy"] for b in base}
        change = [r["mean_auroc"] - b_auroc[s] for r, s in zip(own, seeds) if s in b_auroc]
        acc = [100 * r["id_accuracy"] if r["id_accuracy"] is not None else math.nan for r in own]
        acc_change = [a - b_acc[s] for a, s in zip(acc, seeds) if s in b_acc]
        keys = sorted(set().union(*[c["telemetry"] for c in got]) - {"loss"})[:6]
        tele = ", ".join(f"{k}={mean_std([c['telemetry'].get(k, math.nan) for c in got])[0]:.3g}" for k in keys)
        rows.append([f"{m} / {own[0]['detector']}"] + [cell([r["auroc"][o] for r in own]) for o in oods]
                    + [cell([r["mean_auroc"] for r in own]), cell(change, signed=True),
                       cell([r["mean_fpr95"] for r in own]), cell(acc),
                       cell(acc_change, signed=True), f"{mean_std([c['train_s'] for c in got])[0]:.0f}",
                       tele])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    return "\n".join([fmt.format(*head), "-" * (sum(widths) + 3 * len(widths))] + [fmt.format(*r) for r in rows])


def write_csv(path, base, cells, oods) -> None:
    """One row per (seed, method) cell, the pretrained MSP as method "pretrained": AUROC per OOD set, mean AUROC,
    mean FPR95, ID accuracy (%) and training seconds."""
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["seed", "method", "detector"] + [f"auroc_{o}" for o in oods]
                        + ["mean_auroc", "mean_fpr95", "id_accuracy", "train_s"])
        rows = [(b["seed"], "pretrained", b["rows"]["msp"], None) for b in base]
        rows += [(c["seed"], c["method"], c["rows"][c["own"]], c["train_s"]) for c in cells]
        for seed, method, r, train_s in rows:
            acc = None if r["id_accuracy"] is None else 100 * r["id_accuracy"]
            writer.writerow([seed, method, r["detector"]] + [r["auroc"].get(o) for o in oods]
                            + [r["mean_auroc"], r["mean_fpr95"], acc, train_s])


def plot(path, base, cells, methods):
    """Mean AUROC over the OOD sets per method (mean +- std over seeds) against the pretrained MSP's (a line); None
    without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    names = [m for m in methods if any(c["method"] == m for c in cells)]
    stats = [mean_std([c["rows"][c["own"]]["mean_auroc"] for c in cells if c["method"] == m]) for m in names]
    msp = mean_std([b["rows"]["msp"]["mean_auroc"] for b in base])[0]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    ax.barh(range(len(names)), [s[0] for s in stats], xerr=[s[1] for s in stats], color="tab:blue")
    ax.axvline(msp, color="0.3", linestyle="--", label=f"pretrained MSP {msp:.1f}")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mean AUROC over the OOD sets (%), mean +- std over seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=["all"])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every method (default 1000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--cvae-epochs", type=int, default=5)
    p.add_argument("--eval-n", type=int, default=2000)
    p.add_argument("--train-n", type=int, default=None, help="subsample the ID training set (quick runs)")
    p.add_argument("--cache", default=None, help="pretrained-network cache (default: fastood's)")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a keyword argument for one method's trainer (repeatable): an ablation variant, cached and "
                        "reported as its own row")
    p.add_argument("--quick", action="store_true", help="mnist5k-0to4, 1 seed, 4 steps: a smoke test")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.seeds, args.steps = "mnist5k-0to4", args.seeds[:1], 4
        args.pretrain_epochs, args.cvae_epochs = 1, 1
        args.eval_n, args.train_n = 64, args.train_n or 256
    methods = [m for m in METHODS if m != "standard"] + ["standard"] if args.methods == ["all"] else args.methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    try:
        args.options = parse_sets(args.sets, methods)
    except ValueError as exc:
        p.error(str(exc))
    names = [variant(m, args.options.get(m)) for m in methods]  # the rows: a method, or its --set variant
    cells, log = open_run(args)
    t0 = time.time()
    tag = run_tag(args)
    base, results = [], []
    for seed in args.seeds:
        base.append(cells.run(f"{tag}_s{seed}_pretrained", lambda: baseline_cell(args, seed), log))
        for m, name in zip(methods, names):
            results.append(run_method_cell(cells, f"{tag}_s{seed}_{name}", args, seed, m, log))
    oods = list(base[0]["rows"]["msp"]["auroc"])
    text = table(base, results, names, oods)
    meta = {"command": "python bench/compare_methods.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "data": args.data, "seeds": args.seeds,
            "budget": f"{args.steps} steps of {args.batch_size} ID images per method (pretraining "
                      f"{args.pretrain_epochs} epochs, CVAEs {args.cvae_epochs} epochs)",
            "evaluation": f"{args.eval_n} images per set", "wall_s (this invocation)": round(time.time() - t0, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare_methods.txt"), "w") as fh:
        fh.write("\n".join(f"{k}: {v}" for k, v in meta.items()) + "\n\n" + text + "\n")
    with open(os.path.join(args.out, "compare_methods.md"), "w") as fh:
        fh.write("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
                 + table(base, results, names, oods, markdown=True)
                 + "\n")
    with open(os.path.join(args.out, "compare_methods.json"), "w") as fh:
        json.dump({"meta": meta, "pretrained": base, "methods": results}, fh, indent=1)
    write_csv(os.path.join(args.out, "compare_methods.csv"), base, results, oods)
    png = plot(os.path.join(args.out, "compare_methods.png"), base, results, names)
    print(text)
    print(f"\nwritten: {os.path.join(args.out, 'compare_methods.{txt,md,json,csv}')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
