import csv
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import MSP
from fastood.evaluation import compare, evaluate


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
    assert report.metrics["near-zero"]["auroc"] == 1.0 and report.average["fpr95"] == 0.0
    assert report.id_accuracy == 1.0 and report.harmonic == 1.0
    text = report.table()
    assert "near-zero" in text and "average" in text and "ID accuracy" in text
    data = json.loads(report.to_json(tmp_path / "r.json"))
    assert data["ood"]["tensors"]["auroc"] == 1.0 and (tmp_path / "r.json").exists()
    report.to_csv(tmp_path / "r.csv")
    rows = list(csv.reader(open(tmp_path / "r.csv")))
    assert rows[0][:3] == ["detector", "ood_set", "auroc"] and len(rows) == 4
    paths = report.plot(tmp_path / "plots")
    assert len(paths) == 2
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = compare({"msp": report, "again": report})
    assert "msp" in table and "100.00" in table


def test_evaluate_without_ood_sets_is_an_error():
    model, id_loader, _ = _setup()
    with pytest.raises(ValueError, match="ood_loaders is empty"):
        evaluate(MSP(model), id_loader, {}, progress=False)


def test_unlabeled_id_loader_reports_no_accuracy():
    model, id_loader, ood = _setup()
    images_only = [b[0] for b in id_loader]
    report = evaluate(MSP(model), images_only, ood, progress=False)
    assert report.id_accuracy is None and report.harmonic is None
