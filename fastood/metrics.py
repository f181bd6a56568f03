"""OOD detection metrics (scores: higher = more OOD).

All metrics are exact with tied scores (thresholds sweep the distinct score values) and agree with
scikit-learn's ``roc_auc_score`` / ``average_precision_score``.
"""
import numpy as np
import torch

FPR95_CONVENTIONS = ("id", "ood")


def _as_array(name, scores):
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a tensor, array or sequence of numbers, got {type(scores).__name__}") from None
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); scores must be finite")
    return arr


def _roc(score_id, score_ood):
    """ROC of 'OOD = positive', one point per distinct threshold: (fpr, tpr, thresholds), starting at (0, 0)."""
    scores = np.concatenate([score_ood, score_id])
    positive = np.concatenate([np.ones(score_ood.size), np.zeros(score_id.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tp = np.cumsum(positive)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, tp / score_ood.size]
    fpr = np.r_[0.0, fp / score_id.size]
    return fpr, tpr, np.r_[np.inf, scores[last_of_tie]], np.r_[0.0, tp], np.r_[0.0, fp]


def _average_precision(tp, fp, n_positive):
    """Average precision as scikit-learn defines it: sum over thresholds of (R_n - R_{n-1}) P_n."""
    tp, fp = tp[1:], fp[1:]
    precision = tp / (tp + fp)
    recall = tp / n_positive
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ood_metrics(score_id, score_ood, fpr95_positive="id") -> dict:
    """AUROC, AUPR-in, AUPR-out, FPR at 95% TPR and detection error.

    Args:
        score_id: [N_in] scores of in-distribution samples (higher = more OOD).
        score_ood: [N_out] scores of OOD samples.
        fpr95_positive: ``"id"`` (default, as in the ODIN/FIG papers): the fraction of OOD samples accepted as
            ID when the threshold accepts 95% of the ID samples. ``"ood"``: OOD is the positive class: the
            fraction of ID samples flagged when the threshold flags 95% of the OOD samples.
    Returns:
        dict with ``auroc`` (OOD positive), ``aupr_in`` (ID positive, score negated), ``aupr_out`` (OOD
        positive), ``fpr95`` and ``detection_error`` (``min_t 0.5 (1 - TPR) + 0.5 FPR``).
    """
    if fpr95_positive not in FPR95_CONVENTIONS:
        raise ValueError(f"fpr95_positive must be one of {FPR95_CONVENTIONS}, got {fpr95_positive!r}")
    s_in = _as_array("score_id", score_id)
    s_out = _as_array("score_ood", score_ood)
    fpr, tpr, _, tp, fp = _roc(s_in, s_out)
    auroc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    aupr_out = _average_precision(tp, fp, s_out.size)
    _, _, _, tp_in, fp_in = _roc(-s_out, -s_in)  # ID as the positive class
    aupr_in = _average_precision(tp_in, fp_in, s_in.size)
    if fpr95_positive == "id":
        # Accept x as ID when score <= t; t = the smallest distinct score accepting >= 95% of ID.
        thresholds = np.unique(s_in)
        accepted_id = np.searchsorted(np.sort(s_in), thresholds, side="right") / s_in.size
        t = thresholds[np.argmax(accepted_id >= 0.95 - 1e-12)]
        fpr95 = float(np.mean(s_out <= t))
    else:
        # Flag x as OOD when score >= t; t = the largest distinct score flagging >= 95% of OOD.
        thresholds = np.unique(s_out)[::-1]
        flagged_ood = (s_out.size - np.searchsorted(np.sort(s_out), thresholds, side="left")) / s_out.size
        t = thresholds[np.argmax(flagged_ood >= 0.95 - 1e-12)]
        fpr95 = float(np.mean(s_in >= t))
    detection_error = float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))
    return {"auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out, "fpr95": fpr95,
            "detection_error": detection_error}


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)`` (0 when both are 0), e.g. of AUROC and ID accuracy."""
    a, b = float(a), float(b)
    if a < 0 or b < 0:
        raise ValueError(f"harmonic_mean needs non-negative values, got {a} and {b}")
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def accuracy(predictions, labels) -> float:
    """Fraction of correct predictions. ``predictions``: [N] class indices or [N, C] logits/probabilities."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    if predictions.dim() == 2:
        predictions = predictions.argmax(dim=1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must match")
    if labels.numel() == 0:
        raise ValueError("labels is empty: accuracy needs at least one sample")
    return float((predictions.cpu() == labels.cpu()).double().mean())
