import csv
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import MSP, Discrepancy, Energy, ExtraClass
from fastood.evaluation import Report, compare, evaluate
from fastood.metrics import ood_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _setup():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]]))
        model.bias.zero_()
    # ID points sit far along a class axis (confident); OOD points sit near the origin (uncertain).
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    y = torch.arange(60) % 3
    x_id = centres[y] + 0.1 * torch.randn(60, 2)
    x_ood = 0.05 * torch.randn(40, 2)
    id_loader = DataLoader(TensorDataset(x_id, y), batch_size=16)
    ood = {"near-zero": DataLoader(TensorDataset(x_ood, -torch.ones(40)), batch_size=16),
           "tensors": [x_ood[:20], x_ood[20:]]}
    return model, id_loader, ood


def test_evaluate_separable_data_and_files(tmp_path):
    model, id_loader, ood = _setup()
    report = evaluate(MSP(model), id_loader, ood, progress=False)
    for name in ("near-zero", "tensors"):
        assert report.metrics[name] == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0,
                                        "detection_error": 0.0}
    assert report.id_accuracy == 1.0 and report.harmonic == 1.0
    assert report.scores_id.shape == (60,) and report.scores_ood["tensors"].shape == (40,)
    text = report.table()
    assert "near-zero" in text and "average" in text and "ID accuracy 100.00" in text and "MSP" in text

    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text()) == data
    assert data["ood"]["tensors"]["auroc"] == 1.0 and data["num_id"] == 60 and data["num_ood"]["near-zero"] == 40
    assert data["id_accuracy"] == 1.0 and data["fpr95_positive"] == "id"

    assert report.to_csv(tmp_path / "r.csv") == tmp_path / "r.csv"
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["detector", "ood_set", "auroc", "aupr_in", "aupr_out", "fpr95", "detection_error",
                       "id_accuracy"]
    assert [r[1] for r in rows[1:]] == ["near-zero", "tensors", "average"]
    assert float(rows[3][2]) == 1.0

    paths = report.plot(tmp_path / "plots", prefix="msp_")
    assert [p.name if hasattr(p, "name") else p.rsplit("/", 1)[-1] for p in paths] == ["msp_roc.png",
                                                                                        "msp_histograms.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_metrics_and_averages_match_ood_metrics_on_overlapping_scores():
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    x_id, y = torch.randn(50, 2) * 2, torch.randint(0, 3, (50,))
    ood = {"a": [torch.randn(30, 2)], "b": [torch.randn(20, 2) * 0.5]}
    det = Energy(model)
    report = evaluate(det, [(x_id, y)], ood, progress=False)
    s_id = det.score(x_id)
    for name, batches in ood.items():
        assert report.metrics[name] == ood_metrics(s_id, det.score(batches[0]))
    for k in report.average:
        assert report.average[k] == pytest.approx((report.metrics["a"][k] + report.metrics["b"][k]) / 2)
    with torch.no_grad():
        want_acc = (model(x_id).argmax(1) == y).double().mean().item()
    assert report.id_accuracy == pytest.approx(want_acc)
    assert report.harmonic == pytest.approx(2 * want_acc * report.average["auroc"] / (want_acc + report.average["auroc"]))
    other = evaluate(det, [(x_id, y)], ood, progress=False, fpr95_positive="ood")
    assert other.metrics["a"]["fpr95"] == ood_metrics(s_id, det.score(ood["a"][0]), fpr95_positive="ood")["fpr95"]


def test_accuracy_uses_each_detectors_own_classification():
    x = torch.tensor([[0.0, 0.0, 0.0, 9.0], [0.0, 5.0, 0.0, 9.0], [0.0, 0.0, 5.0, 0.0]])
    y = torch.tensor([0, 1, 2])
    # ExtraClass: the last output is the outlier class; argmax over the first three is right for every row.
    report = evaluate(ExtraClass(nn.Identity()), [(x, y)], {"o": [x]}, progress=False)
    assert report.id_accuracy == 1.0
    assert evaluate(MSP(nn.Identity()), [(x, y)], {"o": [x]}, progress=False).id_accuracy == pytest.approx(1 / 3)

    class Two(nn.Module):
        def forward(self, t):
            return t[:, :3], t[:, 3:]

    # Head 1 says class 0 weakly, head 2 says class 2 strongly: the mean of probabilities picks class 2.
    z = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 8.0]])
    r = evaluate(Discrepancy(Two()), [(z, torch.tensor([2]))], {"o": [z]}, progress=False)
    assert r.id_accuracy == 1.0


def test_unlabeled_id_loader_reports_no_accuracy(tmp_path):
    model, id_loader, ood = _setup()
    images_only = [b[0] for b in id_loader]
    report = evaluate(MSP(model), images_only, ood, progress=False)
    assert report.id_accuracy is None and report.harmonic is None
    assert "ID accuracy" not in report.table()
    report.to_csv(tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="") as f:
        assert list(csv.reader(f))[1][-1] == ""
    assert json.loads(report.to_json())["id_accuracy"] is None


def test_bad_inputs_are_clear_errors():
    model, id_loader, ood = _setup()
    with pytest.raises(ValueError, match="ood_loaders must be a non-empty dict"):
        evaluate(MSP(model), id_loader, {}, progress=False)
    with pytest.raises(ValueError, match="id_loader yielded no images"):
        evaluate(MSP(model), [], ood, progress=False)
    with pytest.raises(ValueError, match="OOD set 'empty' yielded no images"):
        evaluate(MSP(model), id_loader, {"empty": []}, progress=False)
    nan_batch = torch.full((4, 2), float("nan"))
    with pytest.raises(ValueError, match="NaN/Inf score.*OOD set 'bad'"):
        evaluate(MSP(model), id_loader, {"bad": [nan_batch]}, progress=False)
    with pytest.raises(ValueError, match="NaN/Inf score.*ID set"):
        evaluate(MSP(model), [nan_batch], ood, progress=False)


def test_compare_table():
    model, id_loader, ood = _setup()
    msp = evaluate(MSP(model), id_loader, ood, progress=False)
    unlabeled = evaluate(Energy(model), [b[0] for b in id_loader], ood, progress=False)
    table = compare({"MSP": msp, "Energy, no labels": unlabeled})
    lines = table.splitlines()
    assert "AUROC" in lines[0] and "FPR95" in lines[0] and "ID acc" in lines[0]
    assert lines[2].startswith("MSP") and lines[2].split()[1:] == ["100.00"] * 3 + ["0.00"] * 2 + ["100.00"] * 2
    assert lines[3].startswith("Energy, no labels") and lines[3].rstrip().endswith("-")
    with pytest.raises(ValueError, match="at least one report"):
        compare({})


def test_plot_handles_many_sets_and_ties(tmp_path):
    scores_id = torch.tensor(np.round(np.random.RandomState(0).randn(200), 0), dtype=torch.float32)
    scores_ood = {f"set{i}": scores_id[:50] + i for i in range(5)}
    metrics = {k: ood_metrics(scores_id, v) for k, v in scores_ood.items()}
    report = Report("custom", metrics, None, scores_id, scores_ood)
    paths = report.plot(tmp_path)
    assert all(open(p, "rb").read(8) == PNG_MAGIC for p in paths)
