"""Detectors fit the ecosystem: callable, no ambiguous ``predict``, no float32 ties, scores and metrics equal to
formulas written here independently of fastood (issue 14, section 5)."""
import decimal
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import MSP, ODIN, Energy, Entropy, Mahalanobis, MaxLogit
from fastood.evaluation import evaluate
from fastood.metrics import ood_metrics


def test_detectors_are_callable_and_predict_is_refused_not_guessed():
    model = nn.Linear(5, 3)
    x = torch.randn(8, 5)
    for det in (MSP(model), Energy(model), Entropy(model), MaxLogit(model), ODIN(model)):
        assert torch.equal(det(x), det.score(x))
    det = Energy(model)
    # pytorch-ood's Detector.predict(x) returns OOD scores; fastood's class indices have their own name
    assert not hasattr(det, "predict")
    with pytest.raises(AttributeError, match=r"predict is ambiguous.*det\.score\(x\) or det\(x\).*predict_class"):
        det.predict(x)
    assert torch.equal(det.predict_class(x), model(x).argmax(1))


def _two_class_entropy(gap):
    """H(softmax([0, -gap])) in exact closed form: log(1 + e^-g) + g e^-g / (1 + e^-g)."""
    e = math.exp(-gap)
    return math.log1p(e) + gap * e / (1 + e)


def test_entropy_of_confident_inputs_does_not_underflow():
    # Before: float32 entropy was exactly 0 beyond a top-2 gap of ~103 (and denormal, imprecise from ~87): ties.
    gaps = torch.arange(88.0, 300.0, 7.0)
    logits = torch.stack([torch.zeros_like(gaps), -gaps], 1)
    scores = Entropy(nn.Identity()).score(logits)
    assert scores.dtype == torch.float64
    want = torch.tensor([_two_class_entropy(float(g)) for g in gaps], dtype=torch.float64)
    torch.testing.assert_close(scores, want, rtol=1e-12, atol=0)
    assert bool((scores > 0).all()) and bool((scores.diff() < 0).all())  # all distinct, ranked by confidence


def test_entropy_ranks_noise_through_a_confident_model_without_ties():
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight.mul_(600.0)  # top-2 logit gaps far above 87 for most inputs
    x = torch.rand(48, 64) * 2 - 1
    with torch.no_grad():
        logits = model(x).double()
    assert float((logits.topk(2).values.diff(dim=1).abs() > 87).float().mean()) > 0.3
    scores = Entropy(model).score(x)
    assert scores.unique().numel() == 48
    # ground truth in 300-digit decimal arithmetic, -sum p log p written out
    with decimal.localcontext() as ctx:
        ctx.prec = 300  # e^-600 next to 1 needs ~260 digits before the entropy shows
        exact = []
        for row in logits.tolist():
            m = max(row)
            e = [decimal.Decimal(v - m).exp() for v in row]
            total = sum(e)
            exact.append(float(-sum((w / total) * (w / total).ln() for w in e)))
    exact = torch.tensor(exact, dtype=torch.float64)
    normal = exact > 1e-290  # beyond float64's normal range (top-2 gap > ~660) a score is denormal and coarse
    assert float(normal.float().mean()) > 0.9
    torch.testing.assert_close(scores[normal], exact[normal], rtol=1e-12, atol=0)


def test_msp_keeps_order_where_float32_saturates_at_one():
    gaps = torch.arange(18.0, 36.0, 1.0)  # float32 MSP = -1 exactly for all of these
    logits = torch.stack([torch.zeros_like(gaps), -gaps], 1)
    assert bool((torch.softmax(logits, 1).amax(1) == 1).all())  # the float32 ties MSP used to return
    scores = MSP(nn.Identity()).score(logits)
    want = torch.tensor([-1 / (1 + math.exp(-float(g))) for g in gaps], dtype=torch.float64)
    torch.testing.assert_close(scores, want, rtol=1e-15, atol=0)
    assert bool((scores.diff() < 0).all())


def _auroc_pairs(s_in, s_out):
    """P(score_out > score_in) + 0.5 P(tie), over every (ID, OOD) pair: the AUROC with OOD positive."""
    s_in, s_out = np.asarray(s_in, float)[:, None], np.asarray(s_out, float)[None, :]
    return float(((s_out > s_in) + 0.5 * (s_out == s_in)).mean())


def _average_precision(pos, neg):
    """Mean over positives of the precision at that positive's score (ties taken as a block)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    precisions = [((pos >= t).sum()) / ((pos >= t).sum() + (neg >= t).sum()) for t in pos]
    return float(np.mean(precisions))


def test_scores_and_metrics_match_formulas_written_here():
    torch.manual_seed(3)
    model = nn.Linear(6, 4)
    x_in, x_out = torch.randn(120, 6) * 3, torch.randn(80, 6) * 0.5
    f_in, f_out = (model(x).double().detach() for x in (x_in, x_out))

    def msp(f):
        e = np.exp(f - f.max(1, keepdims=True))
        return -(e / e.sum(1, keepdims=True)).max(1)

    def energy(f):
        m = f.max(1)
        return -(m + np.log(np.exp(f - m[:, None]).sum(1)))

    def entropy(f):
        p = np.exp(f - f.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return -(p * np.log(p)).sum(1)

    formulas = {MSP: msp, Energy: energy, Entropy: entropy, MaxLogit: lambda f: -f.max(1)}
    for cls, formula in formulas.items():
        det = cls(model)
        s_in = det.score(x_in).double().numpy()
        np.testing.assert_allclose(s_in, formula(f_in.numpy()), rtol=1e-5, atol=1e-6)
        s_out = det.score(x_out).double().numpy()
        report = evaluate(det, DataLoader(TensorDataset(x_in), batch_size=50), {"o": [x_out[:30], x_out[30:]]},
                          progress=False)
        m = report.metrics["o"]
        assert m["auroc"] == pytest.approx(_auroc_pairs(s_in, s_out), abs=1e-12)
        assert m["aupr_out"] == pytest.approx(_average_precision(s_out, s_in), abs=1e-12)
        assert m["aupr_in"] == pytest.approx(_average_precision(-s_in, -s_out), abs=1e-12)
        # FPR95, ID positive (ODIN/FIG, OpenOOD): accept the 95% least-OOD ID inputs; OOD accepted with them
        threshold = np.sort(s_in)[math.ceil(0.95 * len(s_in)) - 1]
        assert m["fpr95"] == pytest.approx(float((s_out <= threshold).mean()), abs=1e-12)
        # FPR95, OOD positive (pytorch-ood): flag the 95% most-OOD OOD inputs; ID flagged with them
        threshold = np.sort(s_out)[::-1][math.ceil(0.95 * len(s_out)) - 1]
        ood_pos = ood_metrics(s_in, s_out, fpr95_positive="ood")["fpr95"]
        assert ood_pos == pytest.approx(float((s_in >= threshold).mean()), abs=1e-12)


def test_odin_epsilon_in_pixel_units_moves_each_channel_by_epsilon_over_std():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    std = (0.2, 0.5, 1.0)
    x = torch.randn(6, 3, 4, 4)
    moved = ODIN(model, T=10.0, epsilon=0.01, std=std).perturb(x) - x
    for c, s in enumerate(std):
        torch.testing.assert_close(moved[:, c].abs(), torch.full_like(moved[:, c], 0.01 / s))
    plain = ODIN(model, T=10.0, epsilon=0.01).perturb(x) - x
    torch.testing.assert_close(plain.abs(), torch.full_like(plain, 0.01))
    with pytest.raises(ValueError, match="std has 3 values but the images have shape"):
        ODIN(model, std=std).perturb(torch.randn(2, 48))
    with pytest.raises(ValueError, match="std must be a positive number"):
        ODIN(model, std=(0.2, 0.0, 1.0))


def test_bounds_for_mean_std_normalized_data():
    from fastood.data import bounds_for

    lower, upper = bounds_for((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert lower == pytest.approx(((0 - 0.4914) / 0.2470, (0 - 0.4822) / 0.2435, (0 - 0.4465) / 0.2616))
    assert upper == pytest.approx(((1 - 0.4914) / 0.2470, (1 - 0.4822) / 0.2435, (1 - 0.4465) / 0.2616))
    assert bounds_for(0.5, 0.5) == ((-1.0,), (1.0,))
    assert bounds_for(torch.tensor([127.5]), 127.5, pixel_range=(0, 255)) == ((-1.0,), (1.0,))
    with pytest.raises(ValueError, match="std must be > 0"):
        bounds_for(0.5, (0.2, 0.0, 0.1))
    with pytest.raises(ValueError, match="mean and std have 2 and 3 values"):
        bounds_for((0.5, 0.5), (0.2, 0.2, 0.2))
    with pytest.raises(ValueError, match="pixel_range must satisfy lo < hi"):
        bounds_for(0.5, 0.5, pixel_range=(1, 0))


def test_dict_batches_for_detectors_mahalanobis_and_evaluate():
    # Before: "got dict" (detectors), "needs (images, labels)" (Mahalanobis.fit), KeyError in evaluate.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(40, 4), torch.arange(40) % 2
    dicts = [{"image": x[i:i + 10], "label": y[i:i + 10]} for i in range(0, 40, 10)]
    det = Mahalanobis(net).fit(dicts)
    torch.testing.assert_close(det.score_loader(dicts), det.score(x).cpu())
    report = evaluate(MSP(net), dicts, {"noise": [{"image": torch.randn(10, 4) * 5}]}, progress=False)
    assert report.id_accuracy == pytest.approx(float((net(x).argmax(1) == y).float().mean()))
    custom = [{"pic": x[:20], "cls": y[:20]}]
    with pytest.raises(KeyError, match=r"keys \['cls', 'pic'\]: none is a known image key"):
        MSP(net).score_loader(custom)
    assert MSP(net, batch_keys=("pic", "cls")).score_loader(custom).shape == (20,)
    report = evaluate(MSP(net), custom, {"o": [{"pic": x[20:]}]}, batch_keys=("pic", "cls"), progress=False)
    assert report.id_accuracy is not None
    with pytest.raises(TypeError, match=r"must be a DataLoader .*got the dataset TensorDataset"):
        MSP(net).score_loader(TensorDataset(x))


def test_detectors_and_samplers_do_not_import_the_trainers():
    # Before: detectors.base imported first_item/model_device from trainers.base, whose package imports every
    # trainer (an import circle: trainers import detectors). fastood.batches owns them now.
    code = ("import sys, fastood.detectors, fastood.samplers, fastood.evaluation; "
            "print(sorted(m for m in sys.modules if m.startswith('fastood.trainers')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    from fastood.batches import first_item, model_device
    from fastood.trainers import base

    assert base.first_item is first_item and base.model_device is model_device  # old names still work
