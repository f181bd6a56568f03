"""Hyperparameter selection for ODIN / Mahalanobis on a validation split, as their papers do."""
import itertools

from fastood.metrics import ood_metrics


def tune_detector(make_detector, grid: dict, id_val_loader, ood_val_loader, fit_loader=None, metric: str = "auroc"):
    """Pick the detector hyperparameters that maximize ``metric`` (or minimize ``fpr95``/``detection_error``).

    Args:
        make_detector: ``callable(**params) -> Detector``, e.g. ``lambda **p: ODIN(model, **p)``.
        grid: ``{"T": [1, 10, 1000], "epsilon": [0, 0.001, 0.002]}``.
        id_val_loader, ood_val_loader: *validation* data: never the test OOD sets.
        fit_loader: ID training data passed to ``fit`` (Mahalanobis), or None.
    Returns:
        ``(best_detector, best_params, results)`` with ``results`` a list of ``(params, metrics)``.
    """
    lower_is_better = metric in ("fpr95", "detection_error")
    keys = list(grid)
    results, best = [], None
    for values in itertools.product(*(grid[k] for k in keys)):
        params = dict(zip(keys, values))
        det = make_detector(**params)
        if fit_loader is not None:
            det.fit(fit_loader)
        m = ood_metrics(det.score_loader(id_val_loader), det.score_loader(ood_val_loader))
        if metric not in m:
            raise ValueError(f"metric must be one of {sorted(m)}, got {metric!r}")
        results.append((params, m))
        value = -m[metric] if lower_is_better else m[metric]
        if best is None or value > best[0]:
            best = (value, det, params)
    return best[1], best[2], results
