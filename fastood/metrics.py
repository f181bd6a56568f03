"""OOD detection metrics. Scores everywhere: higher = more OOD.

Everything is computed from one sort of the pooled scores (O(n log n)), sweeping the distinct score values
as thresholds, so tied scores are handled exactly. AUROC and the two AUPRs agree with scikit-learn's
``roc_auc_score`` / ``average_precision_score`` (tests hold them to 1e-9); scikit-learn itself is not used.

Conventions (as in the ODIN / FIG papers):

- AUROC and AUPR-out treat OOD as the positive class and the score as is.
- AUPR-in treats ID as the positive class, ranked by the negated score.
- FPR95 (default, ``fpr95_positive="id"``): the fraction of OOD inputs *accepted as ID* by the threshold
  that accepts 95% of the ID inputs (ID positive, ODIN's "FPR at 95% TPR"). ``fpr95_positive="ood"``
  gives the other convention: the fraction of ID inputs flagged by the threshold flagging 95% of OOD.
- Detection error: ``min_t 0.5 (1 - TPR(t)) + 0.5 FPR(t)`` (ODIN), the same for either positive class.
"""
import numpy as np
import torch

FPR95_CONVENTIONS = ("id", "ood")
METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_error")


def _as_scores(name: str, scores) -> np.ndarray:
    """``scores`` (tensor, array or sequence) -> finite 1-D float64 array; clear errors otherwise."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a tensor, array or sequence of numbers, got {type(scores).__name__}") from None
    if arr.ndim > 1 and sum(d > 1 for d in arr.shape) > 1:
        raise ValueError(f"{name} must be 1-D (one score per input), got shape {tuple(arr.shape)}")
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"{name} contains {int((~finite).sum())} NaN/Inf value(s) out of {arr.size}; "
                         "scores must be finite")
    return arr


def _sweep(positive_scores: np.ndarray, negative_scores: np.ndarray):
    """True/false positive counts when flagging ``score >= t``, for each distinct score t from high to low.

    Returns ``(tp, fp, thresholds)``, each [T + 1], starting with the point ``t = +inf`` (nothing flagged).
    """
    scores = np.concatenate([positive_scores, negative_scores])
    is_positive = np.concatenate([np.ones(positive_scores.size), np.zeros(negative_scores.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_positive = scores[order], is_positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # a threshold flags a whole tie
    tp = np.cumsum(is_positive)[last_of_tie]
    fp = last_of_tie + 1 - tp
    return np.r_[0.0, tp], np.r_[0.0, fp], np.r_[np.inf, scores[last_of_tie]]


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> float:
    """scikit-learn's average precision ``sum_n (R_n - R_{n-1}) P_n`` over the sweep of :func:`_sweep`."""
    recall = tp / tp[-1]
    precision = tp[1:] / (tp[1:] + fp[1:])
    return float(np.sum(np.diff(recall) * precision))


def roc_curve(score_id, score_ood):
    """ROC with OOD as the positive class (flag an input as OOD when ``score >= t``).

    Args:
        score_id: [N_in] ID scores; score_ood: [N_out] OOD scores (higher = more OOD).
    Returns:
        ``(fpr, tpr, thresholds)``, float64 arrays [T + 1] for the T distinct scores from high to low,
        starting at ``(0, 0, +inf)``: ``fpr`` = fraction of ID flagged, ``tpr`` = fraction of OOD flagged.
    """
    s_in, s_out = _as_scores("score_id", score_id), _as_scores("score_ood", score_ood)
    tp, fp, thresholds = _sweep(s_out, s_in)
    return fp / s_in.size, tp / s_out.size, thresholds


def fpr_at_tpr(score_id, score_ood, tpr: float = 0.95, positive: str = "id") -> float:
    """False positive rate at the first threshold whose true positive rate reaches ``tpr``.

    ``positive="id"`` (ODIN/FIG): accept as ID when ``score <= t``, t = the smallest score accepting at least
    ``tpr`` of the ID inputs; returns the fraction of OOD inputs accepted. ``positive="ood"``: flag as OOD when
    ``score >= t``, t = the largest score flagging at least ``tpr`` of the OOD inputs; returns the fraction of
    ID inputs flagged. Ties are resolved in the same direction as the threshold (all tied inputs go together).
    """
    if positive not in FPR95_CONVENTIONS:
        raise ValueError(f"positive must be one of {FPR95_CONVENTIONS}, got {positive!r}")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    s_in, s_out = _as_scores("score_id", score_id), _as_scores("score_ood", score_ood)
    if positive == "id":
        pos, neg = np.sort(s_in), s_out
    else:  # negate so that "accept the k smallest" is again the rule
        pos, neg = np.sort(-s_out), -s_in
    # k = ceil(tpr * n) without float round-off pushing e.g. 0.95 * 300 to 286.
    k = max(1, int(np.ceil(round(tpr * pos.size, 9))))
    threshold = pos[k - 1]
    return float(np.mean(neg <= threshold))


def ood_metrics(score_id, score_ood, fpr95_positive: str = "id") -> dict:
    """The five OOD-detection metrics of the ODIN / FIG papers.

    Args:
        score_id: [N_in] scores of in-distribution inputs (higher = more OOD); torch tensor, numpy array or list.
        score_ood: [N_out] scores of OOD inputs.
        fpr95_positive: ``"id"`` (default, ODIN/FIG): fraction of OOD accepted when 95% of ID is accepted.
            ``"ood"``: fraction of ID flagged when 95% of OOD is flagged.
    Returns:
        ``{"auroc", "aupr_in", "aupr_out", "fpr95", "detection_error"}`` as floats in [0, 1].
    Raises:
        ValueError if a side is empty or holds NaN/Inf (the message names the argument).
    """
    if fpr95_positive not in FPR95_CONVENTIONS:
        raise ValueError(f"fpr95_positive must be one of {FPR95_CONVENTIONS}, got {fpr95_positive!r}")
    s_in, s_out = _as_scores("score_id", score_id), _as_scores("score_ood", score_ood)
    tp, fp, _ = _sweep(s_out, s_in)                       # OOD positive
    tpr, fpr = tp / s_out.size, fp / s_in.size
    # trapezoids (ties count one half) summed on the integer counts, divided once: exact, so a perfect
    # separation gives exactly 1.0 however many distinct scores there are
    auroc = float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])) / (2.0 * s_in.size * s_out.size))
    tp_in, fp_in, _ = _sweep(-s_in, -s_out)               # ID positive, ranked by -score
    return {
        "auroc": auroc,
        "aupr_in": _average_precision(tp_in, fp_in),
        "aupr_out": _average_precision(tp, fp),
        "fpr95": fpr_at_tpr(s_in, s_out, 0.95, fpr95_positive),
        "detection_error": float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr)),
    }


def harmonic_mean(a: float, b: float) -> float:
    """``2ab / (a + b)`` (0 when both are 0), e.g. of AUROC and ID accuracy. Both must be finite and >= 0."""
    a, b = float(a), float(b)
    if not (np.isfinite(a) and np.isfinite(b) and a >= 0 and b >= 0):
        raise ValueError(f"harmonic_mean needs finite non-negative values, got a={a} and b={b}")
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def accuracy(logits_or_predictions, labels) -> float:
    """Fraction of correct predictions.

    Args:
        logits_or_predictions: [N] predicted class indices, or [N, C] logits/probabilities (argmax taken).
        labels: [N] true class indices.
    """
    pred = torch.as_tensor(logits_or_predictions).detach().cpu()
    labels = torch.as_tensor(labels).detach().cpu()
    if pred.dim() == 2:
        pred = pred.argmax(dim=1)
    if pred.dim() != 1 or labels.dim() != 1 or pred.shape != labels.shape:
        raise ValueError(f"logits_or_predictions must be [N] or [N, C] and labels [N] with the same N, got "
                         f"{tuple(torch.as_tensor(logits_or_predictions).shape)} and {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("labels is empty: accuracy needs at least one sample")
    return float((pred.long() == labels.long()).double().mean())
