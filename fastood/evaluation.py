"""Run a detector over an ID test set and OOD sets and report the papers' metrics (table, JSON, CSV, plots).

    report = evaluate(Energy(model), id_test_loader, {"noise": noise_loader, "svhn": svhn_loader})
    print(report.table()); report.to_json("energy.json"); report.plot("plots/")
    print(compare({"MSP": msp_report, "Energy": report}))

Scores: higher = more OOD. Metrics: see :mod:`fastood.metrics`.
"""
import csv
import json
import os

import numpy as np
import torch

from fastood.metrics import METRIC_NAMES, harmonic_mean, ood_metrics, roc_curve

METRICS = METRIC_NAMES
_LABELS = {"auroc": "AUROC", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out", "fpr95": "FPR95",
           "detection_error": "DetErr"}


class Report:
    """What :func:`evaluate` measured.

    Attributes:
        detector: the detector's name (with hyperparameters).
        metrics: ``{ood_name: {metric: value}}`` (values in [0, 1]).
        average: ``{metric: mean over the OOD sets}``.
        id_accuracy: accuracy of the detector's classifier on the ID set, or None (no labels / no predictions).
        harmonic: harmonic mean of the average AUROC and ``id_accuracy``, or None.
        scores_id: [N] CPU float tensor; scores_ood: ``{ood_name: [M] CPU float tensor}`` (kept for plots).
        fpr95_positive: the FPR95 convention used (see :func:`fastood.metrics.ood_metrics`).
    """

    def __init__(self, detector_name: str, metrics: dict, id_accuracy, scores_id, scores_ood: dict,
                 fpr95_positive: str = "id"):
        if not metrics:
            raise ValueError("Report needs metrics for at least one OOD set")
        self.detector = detector_name
        self.metrics = metrics
        self.average = {k: float(np.mean([m[k] for m in metrics.values()])) for k in METRICS}
        self.id_accuracy = id_accuracy
        self.harmonic = None if id_accuracy is None else harmonic_mean(self.average["auroc"], id_accuracy)
        self.scores_id = scores_id
        self.scores_ood = scores_ood
        self.fpr95_positive = fpr95_positive

    # ------------------------------------------------------------------ text
    def to_dict(self) -> dict:
        """Everything but the raw scores, JSON-ready."""
        return {"detector": self.detector, "id_accuracy": self.id_accuracy,
                "harmonic_auroc_accuracy": self.harmonic, "fpr95_positive": self.fpr95_positive,
                "num_id": int(self.scores_id.numel()),
                "num_ood": {k: int(v.numel()) for k, v in self.scores_ood.items()},
                "average": self.average, "ood": self.metrics}

    def table(self) -> str:
        """A text table in percent: one row per OOD set, then their average, then ID accuracy."""
        width = max([18] + [len(n) + 2 for n in self.metrics])
        header = f"{'OOD set':{width}s}" + "".join(f"{_LABELS[k]:>10s}" for k in METRICS)
        lines = [f"detector: {self.detector}   (higher score = more OOD; FPR95 with {self.fpr95_positive} positive)",
                 header, "-" * len(header)]
        for name, m in list(self.metrics.items()) + [("average", self.average)]:
            lines.append(f"{name:{width}s}" + "".join(f"{100 * m[k]:10.2f}" for k in METRICS))
        if self.id_accuracy is not None:
            lines.append(f"ID accuracy {100 * self.id_accuracy:.2f}   "
                         f"harmonic mean (AUROC, accuracy) {100 * self.harmonic:.2f}")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def to_json(self, path=None) -> str:
        """The report (without raw scores) as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text + "\n")
        return text

    def to_csv(self, path):
        """One row per OOD set plus an ``average`` row: detector, ood_set, the five metrics, id_accuracy.
        Returns ``path``."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["detector", "ood_set"] + list(METRICS) + ["id_accuracy"])
            for name, m in list(self.metrics.items()) + [("average", self.average)]:
                writer.writerow([self.detector, name] + [m[k] for k in METRICS]
                                + ["" if self.id_accuracy is None else self.id_accuracy])
        return path

    # ------------------------------------------------------------------ figures
    def plot(self, directory, prefix: str = "") -> list:
        """Write ``{prefix}roc.png`` (one ROC curve per OOD set, OOD positive) and ``{prefix}histograms.png``
        (ID vs each OOD set's score histogram) into ``directory`` (created). Returns the two paths.

        Needs matplotlib (drawn with the Agg canvas; pyplot and the global backend are left alone).
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("Report.plot needs matplotlib: pip install matplotlib") from None
        os.makedirs(directory, exist_ok=True)
        s_in = self.scores_id.double().numpy()

        fig = Figure(figsize=(5, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for name, s_out in self.scores_ood.items():
            fpr, tpr, _ = roc_curve(s_in, s_out.double().numpy())
            ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * self.metrics[name]['auroc']:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (ID flagged as OOD)",
               ylabel="true positive rate (OOD flagged)", title=f"ROC: {self.detector}")
        ax.legend(fontsize=7, loc="lower right")
        roc_path = os.path.join(directory, f"{prefix}roc.png")
        fig.savefig(roc_path, dpi=100, bbox_inches="tight")

        n = len(self.scores_ood)
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fig = Figure(figsize=(3.4 * cols, 2.8 * rows))
        FigureCanvasAgg(fig)
        for i, (name, s_out) in enumerate(self.scores_ood.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            s_out = s_out.double().numpy()
            bins = np.histogram_bin_edges(np.r_[s_in, s_out], bins=40)
            ax.hist(s_in, bins=bins, alpha=0.6, density=True, label="ID")
            ax.hist(s_out, bins=bins, alpha=0.6, density=True, label=name)
            ax.set_title(f"{name} (AUROC {100 * self.metrics[name]['auroc']:.1f})", fontsize=8)
            ax.set_xlabel("score (higher = more OOD)", fontsize=7)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.detector}: score histograms", fontsize=9)
        hist_path = os.path.join(directory, f"{prefix}histograms.png")
        fig.savefig(hist_path, dpi=100, bbox_inches="tight")
        return [roc_path, hist_path]


def _checked_metrics(detector_name, name, scores_id, scores_ood, fpr95_positive):
    if scores_ood.numel() == 0:
        raise ValueError(f"OOD set {name!r} yielded no images")
    bad = int((~torch.isfinite(scores_ood)).sum())
    if bad:
        raise ValueError(f"{detector_name} gave {bad} NaN/Inf score(s) on OOD set {name!r}")
    return ood_metrics(scores_id, scores_ood, fpr95_positive=fpr95_positive)


def _class_labels(labels):
    """``labels`` when they are class indices [B] (integers), else None (e.g. OOD-style float targets)."""
    if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        return None
    return labels


def evaluate(detector, id_loader, ood_loaders: dict, progress: bool = True, fpr95_positive: str = "id",
             batch_fn=None, batch_keys=None) -> Report:
    """Score the ID test loader and every OOD loader with ``detector``; compute the metrics of each OOD set.

    Args:
        detector: a fitted :class:`fastood.detectors.Detector`.
        id_loader: ID test data, batches ``(images, labels)`` (labels give ID accuracy from
            ``detector.predict_class``'s decisions, e.g. ExtraClass ignores its outlier class), images alone, or
            dicts (:class:`fastood.batches.BatchReader`).
        ood_loaders: ``{name: loader}``; batches are images, ``(images, ...)`` tuples or dicts.
        progress: tqdm progress bars.
        fpr95_positive: FPR95 convention, ``"id"`` (papers) or ``"ood"``.
        batch_fn, batch_keys: how to read every loader's batches (default: the detector's own reader).
    Returns:
        a :class:`Report`.
    """
    from fastood.batches import BatchReader

    if not isinstance(ood_loaders, dict) or not ood_loaders:
        raise ValueError(f"ood_loaders must be a non-empty dict {{name: loader}}, got {ood_loaders!r}")
    from tqdm.auto import tqdm

    if batch_fn is not None or batch_keys is not None:
        reader = BatchReader(batch_fn=batch_fn, batch_keys=batch_keys)
    else:
        reader = getattr(detector, "batch_reader", None) or BatchReader()
    scores, predictions, labels = [], [], []
    with_accuracy = True
    for x, batch_labels in tqdm(reader.unlabeled(id_loader, "evaluate's id_loader"), desc=f"{detector.name} ID",
                                disable=not progress, leave=False):
        s, p = detector.score_and_predict(x)
        scores.append(s.cpu())
        y = _class_labels(batch_labels)
        if p is None or y is None:
            with_accuracy = False
        elif with_accuracy:
            if y.numel() != p.numel():
                raise ValueError(f"id_loader: a batch has {p.numel()} images but {y.numel()} labels")
            predictions.append(p.cpu())
            labels.append(y.cpu())
    if not scores or sum(s.numel() for s in scores) == 0:
        raise ValueError("id_loader yielded no images")
    scores_id = torch.cat(scores)
    bad = int((~torch.isfinite(scores_id)).sum())
    if bad:
        raise ValueError(f"{detector.name} gave {bad} NaN/Inf score(s) on the ID set")
    accuracy = None
    if with_accuracy and labels:
        accuracy = float((torch.cat(predictions) == torch.cat(labels).long()).double().mean())
    scores_ood, metrics = {}, {}
    for name, loader in ood_loaders.items():
        scores_ood[name] = detector.score_loader(loader, progress=progress, reader=BatchReader(
            batch_fn=reader.batch_fn, batch_keys=None if reader.batch_keys is None else (reader.batch_keys[0], None)))
        metrics[name] = _checked_metrics(detector.name, name, scores_id, scores_ood[name], fpr95_positive)
    return Report(detector.name, metrics, accuracy, scores_id, scores_ood, fpr95_positive)


def compare(reports: dict) -> str:
    """One text table comparing reports ``{row name: Report}``: metrics averaged over each report's OOD sets
    (percent), ID accuracy and the AUROC/accuracy harmonic mean ("-" where a report has no accuracy)."""
    if not reports:
        raise ValueError("compare needs at least one report")
    width = max([12] + [len(str(n)) + 2 for n in reports])
    header = (f"{'method':{width}s}" + "".join(f"{_LABELS[k]:>10s}" for k in METRICS)
              + f"{'ID acc':>10s}{'H(AUROC,acc)':>14s}")
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        acc = "-" if r.id_accuracy is None else f"{100 * r.id_accuracy:.2f}"
        hm = "-" if r.harmonic is None else f"{100 * r.harmonic:.2f}"
        lines.append(f"{name!s:{width}s}" + "".join(f"{100 * r.average[k]:10.2f}" for k in METRICS)
                     + f"{acc:>10s}{hm:>14s}")
    return "\n".join(lines)
