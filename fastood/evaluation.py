"""Run a detector over an ID test set and OOD sets, and report the papers' metrics (table, JSON, CSV, plots)."""
import csv
import json
import os

import numpy as np
import torch

from fastood.metrics import harmonic_mean, ood_metrics

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_error")


class Report:
    """Results of :func:`evaluate`: per-OOD-set metrics, their average, ID accuracy and the raw scores.

    Attributes: ``detector`` (name), ``metrics`` {ood_name: {metric: value}}, ``average`` {metric: value},
    ``id_accuracy`` (None without labels), ``harmonic`` (harmonic mean of mean AUROC and ID accuracy),
    ``scores_id`` [N], ``scores_ood`` {ood_name: [M]}.
    """

    def __init__(self, detector_name, metrics, id_accuracy, scores_id, scores_ood):
        self.detector = detector_name
        self.metrics = metrics
        self.average = {k: float(np.mean([m[k] for m in metrics.values()])) for k in METRICS}
        self.id_accuracy = id_accuracy
        self.harmonic = None if id_accuracy is None else harmonic_mean(self.average["auroc"], id_accuracy)
        self.scores_id = scores_id
        self.scores_ood = scores_ood

    def to_dict(self) -> dict:
        return {"detector": self.detector, "id_accuracy": self.id_accuracy, "harmonic_auroc_accuracy": self.harmonic,
                "average": self.average, "ood": self.metrics}

    def table(self) -> str:
        """A text table: one row per OOD set, then the average (percentages)."""
        header = f"{'OOD set':18s}" + "".join(f"{k:>16s}" for k in METRICS)
        lines = [f"detector: {self.detector}", header, "-" * len(header)]
        for name, m in list(self.metrics.items()) + [("average", self.average)]:
            lines.append(f"{name:18s}" + "".join(f"{100 * m[k]:16.2f}" for k in METRICS))
        if self.id_accuracy is not None:
            lines.append(f"ID accuracy {100 * self.id_accuracy:.2f}%   harmonic(AUROC, acc) {100 * self.harmonic:.2f}%")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def to_json(self, path=None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_csv(self, path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["detector", "ood_set"] + list(METRICS) + ["id_accuracy"])
            for name, m in list(self.metrics.items()) + [("average", self.average)]:
                writer.writerow([self.detector, name] + [m[k] for k in METRICS] + [self.id_accuracy])

    def plot(self, directory, prefix: str = "") -> list:
        """Write ``roc.png`` (one curve per OOD set) and ``histograms.png`` (ID vs each OOD set). Returns the paths."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(directory, exist_ok=True)
        s_in = self.scores_id.numpy()
        fig, ax = plt.subplots(figsize=(5, 5))
        for name, s_out in self.scores_ood.items():
            s_out = s_out.numpy()
            thresholds = np.unique(np.r_[s_in, s_out])[::-1]
            tpr = np.r_[0.0, [(s_out >= t).mean() for t in thresholds]]
            fpr = np.r_[0.0, [(s_in >= t).mean() for t in thresholds]]
            ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * self.metrics[name]['auroc']:.1f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate (ID flagged)", ylabel="true positive rate (OOD flagged)",
               title=f"ROC, {self.detector}")
        ax.legend(fontsize=7, loc="lower right")
        roc_path = os.path.join(directory, f"{prefix}roc.png")
        fig.savefig(roc_path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        n = len(self.scores_ood)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
        for ax, (name, s_out) in zip(axes[0], self.scores_ood.items()):
            bins = np.histogram_bin_edges(np.r_[s_in, s_out.numpy()], bins=40)
            ax.hist(s_in, bins=bins, alpha=0.6, density=True, label="ID")
            ax.hist(s_out.numpy(), bins=bins, alpha=0.6, density=True, label=name)
            ax.set_title(name, fontsize=8)
            ax.legend(fontsize=7)
        fig.suptitle(f"{self.detector} scores (higher = more OOD)", fontsize=9)
        hist_path = os.path.join(directory, f"{prefix}histograms.png")
        fig.savefig(hist_path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return [roc_path, hist_path]


def evaluate(detector, id_loader, ood_loaders: dict, progress: bool = True) -> Report:
    """Score ``id_loader`` and every loader of ``ood_loaders`` ({name: loader}) with ``detector``.

    ID accuracy is measured from the detector's own predictions when the ID loader yields (images, labels).
    """
    if not ood_loaders:
        raise ValueError("ood_loaders is empty: give at least one {name: loader}")
    from tqdm.auto import tqdm

    scores, predictions, labels = [], [], []
    for batch in tqdm(id_loader, desc=f"{detector.name} ID", disable=not progress, leave=False):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        s, p = detector.score_and_predict(x)
        scores.append(s.cpu())
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and p is not None:
            predictions.append(p.cpu())
            labels.append(batch[1].cpu())
    scores_id = torch.cat(scores)
    accuracy = None
    if labels:
        accuracy = float((torch.cat(predictions) == torch.cat(labels)).double().mean())
    scores_ood, metrics = {}, {}
    for name, loader in ood_loaders.items():
        scores_ood[name] = detector.score_loader(loader, progress=progress)
        metrics[name] = ood_metrics(scores_id, scores_ood[name])
    return Report(detector.name, metrics, accuracy, scores_id, scores_ood)


def compare(reports: dict) -> str:
    """One text table comparing several reports ({row name: Report}): mean AUROC, FPR95, ID accuracy."""
    header = f"{'method':40s}{'AUROC':>9s}{'AUPR-in':>9s}{'AUPR-out':>9s}{'FPR95':>9s}{'ID acc':>9s}"
    lines = [header, "-" * len(header)]
    for name, r in reports.items():
        acc = "n/a" if r.id_accuracy is None else f"{100 * r.id_accuracy:.2f}"
        lines.append(f"{name:40s}{100 * r.average['auroc']:9.2f}{100 * r.average['aupr_in']:9.2f}"
                     f"{100 * r.average['aupr_out']:9.2f}{100 * r.average['fpr95']:9.2f}{acc:>9s}")
    return "\n".join(lines)
