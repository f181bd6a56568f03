import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from fastood.metrics import accuracy, harmonic_mean, ood_metrics


def _brute_fpr95(s_in, s_out, positive):
    if positive == "id":
        for t in np.sort(np.unique(s_in)):
            if np.mean(s_in <= t) >= 0.95:
                return np.mean(s_out <= t)
    for t in np.sort(np.unique(s_out))[::-1]:
        if np.mean(s_out >= t) >= 0.95:
            return np.mean(s_in >= t)


def _brute_detection_error(s_in, s_out):
    best = 0.5  # threshold above every score: TPR 0, FPR 0
    for t in np.unique(np.r_[s_in, s_out]):
        best = min(best, 0.5 * (1 - np.mean(s_out >= t)) + 0.5 * np.mean(s_in >= t))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [0, 1, 6])  # 0 and 1: many ties
def test_agrees_with_sklearn_and_brute_force(seed, decimals):
    rng = np.random.RandomState(seed)
    s_in = np.round(rng.randn(300), decimals)
    s_out = np.round(rng.randn(200) + 0.8, decimals)
    m = ood_metrics(s_in, s_out)
    y = np.r_[np.zeros(300), np.ones(200)]
    s = np.r_[s_in, s_out]
    assert abs(m["auroc"] - roc_auc_score(y, s)) < 1e-9
    assert abs(m["aupr_out"] - average_precision_score(y, s)) < 1e-9
    assert abs(m["aupr_in"] - average_precision_score(1 - y, -s)) < 1e-9
    assert abs(m["fpr95"] - _brute_fpr95(s_in, s_out, "id")) < 1e-12
    assert abs(ood_metrics(s_in, s_out, fpr95_positive="ood")["fpr95"] - _brute_fpr95(s_in, s_out, "ood")) < 1e-12
    assert abs(m["detection_error"] - _brute_detection_error(s_in, s_out)) < 1e-12


def test_perfect_and_inverted_separation():
    m = ood_metrics(torch.zeros(50), torch.ones(30))
    assert m["auroc"] == 1.0 and m["fpr95"] == 0.0 and m["detection_error"] == 0.0
    assert m["aupr_in"] == 1.0 and m["aupr_out"] == 1.0
    inv = ood_metrics(torch.ones(50), torch.zeros(30))
    assert inv["auroc"] == 0.0 and inv["fpr95"] == 1.0


def test_all_tied_scores_are_chance():
    m = ood_metrics([1.0] * 10, [1.0] * 10)
    assert m["auroc"] == 0.5 and m["fpr95"] == 1.0 and m["detection_error"] == 0.5


def test_accepts_torch_numpy_and_lists():
    a, b = [0.1, 0.2, 0.3], [0.25, 0.5]
    assert ood_metrics(a, b) == ood_metrics(np.array(a), torch.tensor(b))


@pytest.mark.parametrize("bad_id, bad_ood, match", [
    ([], [1.0], "score_id is empty"),
    ([1.0], [], "score_ood is empty"),
    ([float("nan"), 1.0], [1.0], "score_id contains 1 NaN/Inf"),
    ([1.0], [float("inf")], "score_ood contains 1 NaN/Inf"),
])
def test_bad_scores_are_errors(bad_id, bad_ood, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(bad_id, bad_ood)


def test_bad_convention():
    with pytest.raises(ValueError, match="fpr95_positive must be one of"):
        ood_metrics([0.0], [1.0], fpr95_positive="both")


def test_harmonic_mean_and_accuracy():
    assert harmonic_mean(0.9, 0.6) == pytest.approx(2 * 0.9 * 0.6 / 1.5)
    assert harmonic_mean(0, 0) == 0.0
    with pytest.raises(ValueError):
        harmonic_mean(-1, 0.5)
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([1, 1]), torch.tensor([1, 0])) == 0.5
    with pytest.raises(ValueError, match="must match"):
        accuracy(torch.tensor([1, 1]), torch.tensor([1]))
