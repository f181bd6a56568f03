"""Hyperparameter selection for ODIN / Mahalanobis on a validation split, as their papers do.

Tune on held-out ID data and *validation* outliers (e.g. auxiliary outliers, noise, or a held-out OOD set):
never on the test OOD sets that the final report is computed on, or the numbers are optimistic.
"""
import itertools

from fastood.metrics import METRIC_NAMES, ood_metrics

LOWER_IS_BETTER = ("fpr95", "detection_error")


def tune_detector(make_detector, grid: dict, id_val_loader, ood_val_loader, fit_loader=None,
                  metric: str = "auroc", progress: bool = False):
    """Grid search: the detector whose validation ``metric`` is best (highest, or lowest for ``fpr95`` /
    ``detection_error``; the first in grid order wins ties).

    Args:
        make_detector: ``callable(**params) -> Detector``, e.g. ``lambda **p: ODIN(model, **p)``, or, to fit a
            Mahalanobis detector once: ``maha = Mahalanobis(model).fit(train)`` and ``maha.replace``.
        grid: ``{name: [values]}``, e.g. ``{"T": [1, 10, 1000], "epsilon": [0, 0.0014, 0.004]}``.
        id_val_loader, ood_val_loader: validation ID images and validation outliers (never the test OOD sets).
        fit_loader: labeled ID training data given to each new detector's ``fit`` (Mahalanobis), or None.
        metric: one of ``auroc, aupr_in, aupr_out, fpr95, detection_error``.
    Returns:
        ``(best_detector, best_params, results)``; ``results`` is the table, one ``(params, metrics)`` per grid
        point in grid order (``metrics`` as :func:`fastood.metrics.ood_metrics` returns).
    """
    if metric not in METRIC_NAMES:
        raise ValueError(f"metric must be one of {list(METRIC_NAMES)}, got {metric!r}")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid must be a non-empty dict {{name: [values]}}, got {grid!r}")
    for key, values in grid.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    grid = {key: list(values) for key, values in grid.items()}  # once: a generator would be used up by a check
    for key, values in grid.items():
        if not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got []")
    from tqdm.auto import tqdm

    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    results, best = [], None
    for params in tqdm(points, desc="tuning", disable=not progress, leave=False):
        detector = make_detector(**params)
        if fit_loader is not None:
            detector.fit(fit_loader)
        m = ood_metrics(detector.score_loader(id_val_loader), detector.score_loader(ood_val_loader))
        results.append((params, m))
        if best is None or sign * m[metric] > sign * best[2][metric]:
            best = (detector, params, m)
    return best[0], best[1], results


def tuning_table(results) -> str:
    """A text table of :func:`tune_detector`'s ``results``: one row per grid point, metrics in percent."""
    if not results:
        return "(no results)"
    names = list(results[0][0])
    header = "".join(f"{n:>12s}" for n in names) + "".join(f"{m:>17s}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for params, m in results:
        lines.append("".join(f"{params[n]!s:>12.12s}" for n in names)
                     + "".join(f"{100 * m[k]:17.2f}" for k in METRIC_NAMES))
    return "\n".join(lines)
