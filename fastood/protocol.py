"""The protocol runner shared by the reproduction and quality scripts (``bench/reproduce_*.py``,
``bench/compare_methods.py``): resumable cells, cached models, mean +- std over seeds, and the
``paper | fastood | difference`` table written as text, JSON, CSV and markdown.

A *cell* is one finished unit of work (one seed of one setting) whose result is a JSON-able dict. :class:`Cells`
keeps each under ``<out>/cells/<key>.json`` (written atomically), so an interrupted script run again with the same
``--out`` skips what is done. Trained networks go through :func:`cached_model` (the checksummed, atomic weight
cache of :mod:`fastood.weights_cache`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .weights_cache import load_cached_weights, save_cached_weights

__all__ = ["Cells", "open_run", "run_grid", "cached_model", "mean_std", "format_mean_std", "PaperRow",
           "paper_table", "write_table", "pyplot", "plot_paper_rows", "report", "Stopwatch"]


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(key)).strip("_") or "cell"


class Cells:
    """Finished cells of a run under ``<root>/cells`` (JSON, atomic writes). ``cells.get(key)`` -> dict or None;
    ``cells.put(key, value)``; ``cells.run(key, fn)`` returns the cached value or computes, stores and returns it."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(str(root)))
        self.folder = os.path.join(self.root, "cells")
        os.makedirs(self.folder, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.folder, _slug(key) + ".json")

    def get(self, key: str):
        path = self.path(key)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):  # a damaged cell is recomputed, not trusted
            os.remove(path)
            return None

    def put(self, key: str, value) -> None:
        path = self.path(key)
        tmp = path + ".part"
        with open(tmp, "w") as fh:
            json.dump(value, fh, indent=1, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def run(self, key: str, compute: Callable[[], dict], log=print):
        value = self.get(key)
        if value is not None:
            log(f"[cached] {key}")
            return value
        t0 = time.perf_counter()
        value = compute()
        if isinstance(value, dict):
            value.setdefault("wall_s", round(time.perf_counter() - t0, 1))
        self.put(key, value)
        return value

    def model_path(self, key: str) -> str:
        folder = os.path.join(self.root, "models")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, _slug(key) + ".pt")


def open_run(args) -> tuple:
    """The start of every reproduction script: ``torch.set_num_threads(args.threads)`` when it is given, the run's
    :class:`Cells` under ``args.out``, and a ``log`` that prints (silent with ``args.quiet``). Returns
    ``(cells, log)``."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    log = (lambda *a, **k: None) if getattr(args, "quiet", False) else print
    return Cells(args.out), log


def run_grid(cells: Cells, names, seeds, key: Callable, compute: Callable, log=print) -> list:
    """Every cell of a ``names x seeds`` grid, names outer: ``cells.run(key(name, seed), lambda: compute(name,
    seed))``, cached ones read back. Returns the cells' values in that order."""
    results = []
    for name in names:
        for seed in seeds:
            results.append(cells.run(key(name, seed), lambda: compute(name, seed), log))
    return results


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def cached_model(cells: Cells, key: str, model: torch.nn.Module, train: Callable[[torch.nn.Module], None],
                 log=print) -> torch.nn.Module:
    """``model`` with the weights cached under ``key``, or trained by ``train(model)`` and then cached (a diverged
    model, with non-finite weights, is refused by the cache and never saved over a good one)."""
    path = cells.model_path(key)
    if load_cached_weights(model, path):
        log(f"[cached] model {key}")
        return model
    train(model)
    save_cached_weights(model, path)
    return model


def mean_std(values) -> tuple:
    """``(mean, std)`` of the finite values (sample std, 0 for one value; NaN, NaN for none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def format_mean_std(values, digits: int = 1, scale: float = 1.0) -> str:
    """``"98.7 +- 0.3 (n=3)"``; ``"-"`` when no value is finite."""
    m, s = mean_std(values)
    if not math.isfinite(m):
        return "-"
    n = sum(1 for v in values if v is not None and math.isfinite(float(v)))
    return f"{m * scale:.{digits}f} +- {s * scale:.{digits}f} (n={n})"


@dataclass
class PaperRow:
    """One cell of a reproduced table: the paper's number beside ours (per-seed values), in the same unit."""

    table: str          # e.g. "Table 1, ID MNIST"
    row: str            # e.g. "AUROC vs fashion-mnist"
    paper: Optional[float]
    ours: list = field(default_factory=list)
    note: str = ""

    @property
    def mean(self) -> float:
        return mean_std(self.ours)[0]

    @property
    def std(self) -> float:
        return mean_std(self.ours)[1]

    @property
    def difference(self) -> float:
        if self.paper is None or not math.isfinite(self.mean):
            return math.nan
        return self.mean - self.paper

    def as_dict(self) -> dict:
        return {"table": self.table, "row": self.row, "paper": self.paper, "ours": list(self.ours),
                "mean": self.mean, "std": self.std, "n": len(self.ours), "difference": self.difference,
                "note": self.note}


def _num(value, digits=1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def paper_table(rows, digits: int = 1, markdown: bool = False) -> str:
    """``table | row | paper | fastood (mean +- std over seeds) | difference | note`` as aligned text (or markdown)."""
    head = ["table", "row", "paper", "fastood (mean +- std, n seeds)", "difference", "note"]
    body = []
    for r in rows:
        ours = format_mean_std(r.ours, digits) if r.ours else "not run"
        diff = r.difference
        body.append([r.table, r.row, "n/a" if r.paper is None else _num(r.paper, digits), ours,
                     "-" if not math.isfinite(diff) else f"{diff:+.{digits}f}", r.note])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    lines = [fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*cells) for cells in body]
    return "\n".join(lines)


def write_table(out: str, name: str, rows, meta: dict, digits: int = 1) -> dict:
    """Write ``<out>/<name>.{txt,md,json,csv}``; returns the paths. ``meta`` (command, budgets, timings) goes into
    the JSON and the head of the text and markdown files."""
    os.makedirs(out, exist_ok=True)
    header = "\n".join(f"{k}: {v}" for k, v in meta.items())
    paths = {ext: os.path.join(out, f"{name}.{ext}") for ext in ("txt", "md", "json", "csv")}
    with open(paths["txt"], "w") as fh:
        fh.write(header + "\n\n" + paper_table(rows, digits) + "\n")
    with open(paths["md"], "w") as fh:
        fh.write("\n".join(f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in meta.items()))
        fh.write("\n\n" + paper_table(rows, digits, markdown=True) + "\n")
    with open(paths["json"], "w") as fh:
        json.dump({"meta": meta, "rows": [r.as_dict() for r in rows]}, fh, indent=1, default=_json_default)
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["table", "row", "paper", "mean", "std", "n", "difference", "values", "note"])
        for r in rows:
            writer.writerow([r.table, r.row, r.paper, r.mean, r.std, len(r.ours), r.difference,
                             " ".join(f"{v:.4f}" for v in r.ours), r.note])
    return paths


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not installed (the scripts'
    plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_paper_rows(rows, path: str, title: str = "") -> Optional[str]:
    """A PNG of every row that has a paper value: the paper's number beside fastood's mean with its std over seeds as
    an error bar, one pair of horizontal bars per row. Returns ``path``, or None when matplotlib is missing or no row
    has a paper value and a result."""
    rows = [r for r in rows if r.paper is not None and math.isfinite(r.mean)]
    plt = pyplot()
    if not rows or plt is None:
        return None
    labels = [f"{r.table}: {r.row}" for r in rows]
    y = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh([v + 0.2 for v in y], [r.paper for r in rows], height=0.4, label="paper", color="0.6")
    ax.barh([v - 0.2 for v in y], [r.mean for r in rows], height=0.4, xerr=[r.std if math.isfinite(r.std) else 0
                                                                            for r in rows],
            label="fastood (mean +- std over seeds)", color="tab:blue")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(out: str, name: str, rows, meta: dict, digits: int = 1) -> dict:
    """:func:`write_table`, the paper-vs-fastood plot (``<out>/<name>.png``, with matplotlib) and print the table and
    the written paths (the end of every reproduction script)."""
    paths = write_table(out, name, rows, meta, digits)
    png = plot_paper_rows(rows, os.path.join(out, f"{name}.png"), title=name)
    if png:
        paths["png"] = png
    print(paper_table(rows, digits))
    print(f"\nwritten: {', '.join(paths.values())}")
    return paths


class Stopwatch:
    """Wall time of named stages: ``with sw("train"): ...``; ``sw.times`` -> {name: seconds}."""

    def __init__(self):
        self.times = {}

    def __call__(self, name: str):
        watch = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch.times[name] = round(watch.times.get(name, 0.0) + time.perf_counter() - self.t0, 2)

        return _Timer()
