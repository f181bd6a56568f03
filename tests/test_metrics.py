import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from fastood.metrics import accuracy, fpr_at_tpr, harmonic_mean, ood_metrics, roc_curve


def _brute_fpr(s_in, s_out, positive, level=95):
    """Every candidate threshold tried in turn; integer counts so 95% is exact."""
    if positive == "id":  # accept as ID when score <= t; smallest t accepting >= level% of ID
        for t in np.sort(np.unique(s_in)):
            if 100 * np.sum(s_in <= t) >= level * s_in.size:
                return np.mean(s_out <= t)
    for t in np.sort(np.unique(s_out))[::-1]:  # flag as OOD when score >= t; largest t flagging >= level% of OOD
        if 100 * np.sum(s_out >= t) >= level * s_out.size:
            return np.mean(s_in >= t)
    raise AssertionError("unreachable")


def _brute_detection_error(s_in, s_out):
    best = 0.5  # threshold above every score: nothing flagged
    for t in np.unique(np.r_[s_in, s_out]):
        best = min(best, 0.5 * (1 - np.mean(s_out >= t)) + 0.5 * np.mean(s_in >= t))
    return best


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [0, 1, 6])  # 0 and 1 decimals: many ties, also across ID and OOD
@pytest.mark.parametrize("sizes", [(300, 200), (57, 411)])
def test_agrees_with_sklearn_and_brute_force(seed, decimals, sizes):
    rng = np.random.RandomState(seed)
    n_in, n_out = sizes
    s_in = np.round(rng.randn(n_in), decimals)
    s_out = np.round(rng.randn(n_out) + 0.8, decimals)
    m = ood_metrics(s_in, s_out)
    y = np.r_[np.zeros(n_in), np.ones(n_out)]
    s = np.r_[s_in, s_out]
    assert abs(m["auroc"] - roc_auc_score(y, s)) < 1e-9
    assert abs(m["aupr_out"] - average_precision_score(y, s)) < 1e-9
    assert abs(m["aupr_in"] - average_precision_score(1 - y, -s)) < 1e-9
    assert m["fpr95"] == _brute_fpr(s_in, s_out, "id")
    assert ood_metrics(s_in, s_out, fpr95_positive="ood")["fpr95"] == _brute_fpr(s_in, s_out, "ood")
    assert abs(m["detection_error"] - _brute_detection_error(s_in, s_out)) < 1e-12
    for level in (50, 90, 99):
        for positive in ("id", "ood"):
            assert fpr_at_tpr(s_in, s_out, level / 100, positive) == _brute_fpr(s_in, s_out, positive, level)


def test_conventions_differ_and_are_the_documented_ones():
    # ID scores 0..99, OOD scores 90..189: 95% of ID is accepted at t = 94, which accepts OOD 90..94 (5/100).
    s_in, s_out = np.arange(100.0), np.arange(90.0, 190.0)
    assert ood_metrics(s_in, s_out)["fpr95"] == 0.05
    # 95% of OOD is flagged at t = 95 (95..189), which flags ID 95..99 (5/100).
    assert ood_metrics(s_in, s_out, fpr95_positive="ood")["fpr95"] == 0.05
    s_out = np.arange(90.0, 110.0)  # 20 OOD: 95% = 19 flagged at t = 91, flagging ID 91..99 (9/100)
    assert ood_metrics(s_in, s_out, fpr95_positive="ood")["fpr95"] == 0.09
    assert ood_metrics(s_in, s_out)["fpr95"] == 0.25  # t = 94 accepts OOD 90..94: 5/20


def test_roc_curve_matches_sklearn_with_ties():
    rng = np.random.RandomState(0)
    s_in, s_out = np.round(rng.randn(80), 1), np.round(rng.randn(50) + 1, 1)
    fpr, tpr, thr = roc_curve(torch.tensor(s_in), s_out)
    y = np.r_[np.zeros(80), np.ones(50)]
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert thr[0] == np.inf and fpr[-1] == 1.0 and tpr[-1] == 1.0


def test_perfect_and_inverted_separation():
    m = ood_metrics(torch.zeros(50), torch.ones(30))
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "detection_error": 0.0}
    assert ood_metrics(torch.zeros(50), torch.ones(30), fpr95_positive="ood")["fpr95"] == 0.0
    inv = ood_metrics(torch.ones(50), torch.zeros(30))
    assert inv["auroc"] == 0.0 and inv["fpr95"] == 1.0 and inv["detection_error"] == 0.5


def test_all_tied_scores_are_chance():
    m = ood_metrics([1.0] * 10, [1.0] * 30)
    assert m["auroc"] == 0.5 and m["fpr95"] == 1.0 and m["detection_error"] == 0.5
    assert m["aupr_out"] == 0.75 and m["aupr_in"] == 0.25  # the positive class's prevalence


def test_single_sample_sides():
    assert ood_metrics([0.0], [1.0])["auroc"] == 1.0
    assert ood_metrics([1.0], [0.0])["fpr95"] == 1.0


def test_accepts_torch_numpy_lists_and_column_vectors():
    a, b = [0.1, 0.2, 0.3], [0.25, 0.5]
    ref = ood_metrics(a, b)
    assert ref == ood_metrics(np.array(a), torch.tensor(b))
    assert ref == ood_metrics(torch.tensor(a, dtype=torch.float16).double().reshape(3, 1), np.array(b))
    assert ref == ood_metrics(torch.tensor(a, requires_grad=True), b)


@pytest.mark.parametrize("bad_id, bad_ood, err, match", [
    ([], [1.0], ValueError, "score_id is empty"),
    ([1.0], np.zeros(0), ValueError, "score_ood is empty"),
    ([float("nan"), 1.0], [1.0], ValueError, "score_id contains 1 NaN/Inf"),
    ([1.0], torch.tensor([0.0, float("inf"), float("-inf")]), ValueError, "score_ood contains 2 NaN/Inf"),
    (np.zeros((3, 2)), [1.0], ValueError, r"score_id must be 1-D.*\(3, 2\)"),
    (["a", "b"], [1.0], TypeError, "score_id must be a tensor, array or sequence of numbers"),
])
def test_bad_scores_are_errors(bad_id, bad_ood, err, match):
    with pytest.raises(err, match=match):
        ood_metrics(bad_id, bad_ood)


def test_bad_options():
    with pytest.raises(ValueError, match="fpr95_positive must be one of"):
        ood_metrics([0.0], [1.0], fpr95_positive="both")
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_tpr([0.0], [1.0], tpr=0.0)


def test_harmonic_mean():
    assert harmonic_mean(0.9, 0.6) == pytest.approx(2 * 0.9 * 0.6 / 1.5)
    assert harmonic_mean(1.0, 1.0) == 1.0
    assert harmonic_mean(0, 0) == 0.0
    assert harmonic_mean(0.0, 0.8) == 0.0
    with pytest.raises(ValueError, match="finite non-negative"):
        harmonic_mean(-1, 0.5)
    with pytest.raises(ValueError, match="finite non-negative"):
        harmonic_mean(float("nan"), 0.5)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert accuracy(np.array([1, 1]), [1, 0]) == 0.5
    with pytest.raises(ValueError, match="same N"):
        accuracy(torch.tensor([1, 1]), torch.tensor([1]))
    with pytest.raises(ValueError, match="labels is empty"):
        accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
