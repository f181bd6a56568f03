"""Hyperparameter selection for detectors on a validation split, as their papers do (ODIN, Mahalanobis, ...).

Tune on held-out ID data and *validation* outliers (e.g. auxiliary outliers, noise, or a held-out OOD set):
never on the test OOD sets that the final report is computed on, or the numbers are optimistic.
"""
import itertools
import time

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


def is_fitted(detector, probe) -> bool:
    """False when scoring ``probe`` (a small image batch) raises the detectors' ``RuntimeError("... is not fitted
    ...")`` (e.g. a copy from ``replace`` whose new hyperparameter needs a new fit: ViM's ``D``, ReAct's
    ``percentile``); True otherwise."""
    try:
        detector.score(probe)
    except RuntimeError as err:
        if "not fitted" in str(err):
            return False
        raise
    return True


def tune_fitted(detector, grid: dict, id_val_loader, ood_val_loader, fit_loader=None, metric: str = "auroc",
                convert=None, progress: bool = False):
    """:func:`tune_detector` over the copies ``detector.replace(**params)`` of one detector, fitting only where needed.

    ``detector`` is built (and fitted, if its method needs ID data) once; each grid point is its ``replace`` copy,
    which keeps the fit wherever the hyperparameter does not change it (Mahalanobis' ``epsilon``, DICE's ``p``,
    KNN's ``k``, ...). A copy that comes back unfitted (ViM's ``D``, ReAct's ``percentile``) is fitted on
    ``fit_loader`` (ValueError when that is None). The first fit, if ``detector`` is not fitted yet, is done here too.

    Args:
        convert: optional ``callable(params) -> replace kwargs`` (e.g. pixel-unit noise -> input units); the grid and
            the returned ``params`` / ``results`` stay in the grid's units.
    Returns:
        ``(best_detector, best_params, results, fit_seconds)``: as :func:`tune_detector`, plus the wall time of the
        fit behind the best detector (0.0 when it needed none) and, in ``fit_seconds`` only, no other timing.
    """
    probe = _first_images(id_val_loader, detector)
    fit_time = {}

    def fit(det):
        if fit_loader is None:
            raise ValueError(f"{det.name} needs a fit on ID training data but fit_loader is None")
        t0 = time.perf_counter()
        det.fit(fit_loader)
        return time.perf_counter() - t0

    base_fit = 0.0 if is_fitted(detector, probe) else fit(detector)

    def make(**params):
        det = detector.replace(**(convert(params) if convert is not None else params))
        seconds = base_fit
        if not is_fitted(det, probe):
            seconds = fit(det)
        fit_time[id(det)] = seconds
        return det

    best, params, results = tune_detector(make, grid, id_val_loader, ood_val_loader, metric=metric,
                                          progress=progress)
    return best, params, results, fit_time.get(id(best), base_fit)


def _first_images(loader, detector, n: int = 2):
    """The first ``n`` images of a loader (read as the detector reads batches)."""
    for x, _ in detector.batch_reader.unlabeled(loader, "id_val_loader"):
        if x.shape[0]:
            return x[:n]
    raise ValueError("id_val_loader yielded no images")


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
