"""fastood.protocol: resumable cells, cached models, mean +- std, the paper | fastood | difference table."""
import json
import math
import os

import pytest
import torch
from torch import nn

from fastood.models import VernekarCNN, VernekarCVAE
from fastood.protocol import Cells, PaperRow, cached_model, format_mean_std, mean_std, paper_table, write_table


def test_cells_run_once_and_survive_a_damaged_file(tmp_path):
    cells = Cells(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"auroc": 0.9}

    assert cells.run("a b/c", compute, log=lambda *_: None)["auroc"] == 0.9
    assert cells.run("a b/c", compute, log=lambda *_: None)["auroc"] == 0.9
    assert len(calls) == 1 and "wall_s" in cells.get("a b/c")
    with open(cells.path("a b/c"), "w") as fh:
        fh.write("{truncated")
    assert cells.get("a b/c") is None and not os.path.exists(cells.path("a b/c"))
    assert not [f for f in os.listdir(cells.folder) if f.endswith(".part")]


def test_open_run_and_run_grid(tmp_path, capsys):
    import argparse

    import torch

    from fastood.protocol import open_run, run_grid

    threads = torch.get_num_threads()
    try:
        cells, log = open_run(argparse.Namespace(out=str(tmp_path), threads=1, quiet=True))
        assert torch.get_num_threads() == 1 and cells.folder == str(tmp_path / "cells")
    finally:
        torch.set_num_threads(threads)
    log("nothing")
    assert capsys.readouterr().out == ""  # quiet
    calls = []
    got = run_grid(cells, ["a", "b"], [0, 1], lambda n, s: f"{n}_s{s}",
                   lambda n, s: calls.append((n, s)) or {"v": f"{n}{s}"}, log)
    assert [g["v"] for g in got] == ["a0", "a1", "b0", "b1"] and calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    again = run_grid(cells, ["a", "b"], [0, 1], lambda n, s: f"{n}_s{s}", lambda n, s: calls.append(n), log)
    assert [g["v"] for g in again] == ["a0", "a1", "b0", "b1"] and len(calls) == 4  # read back, not recomputed
    _, loud = open_run(argparse.Namespace(out=str(tmp_path), threads=None, quiet=False))
    loud("said")
    assert capsys.readouterr().out == "said\n"


def test_cached_model_trains_once_and_never_caches_a_diverged_model(tmp_path):
    cells = Cells(tmp_path)
    trained = []

    def train(model):
        trained.append(1)
        with torch.no_grad():
            model.weight.fill_(2.0)

    m = cached_model(cells, "lin", nn.Linear(2, 2), train, log=lambda *_: None)
    again = cached_model(cells, "lin", nn.Linear(2, 2), train, log=lambda *_: None)
    assert len(trained) == 1 and torch.equal(again.weight, m.weight)

    def diverge(model):
        with torch.no_grad():
            model.weight.fill_(float("nan"))

    with pytest.raises(Exception, match="diverged"):
        cached_model(cells, "bad", nn.Linear(2, 2), diverge, log=lambda *_: None)
    assert not os.path.exists(cells.model_path("bad"))


def test_mean_std_and_format():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([float("nan")]))
    assert format_mean_std([97.0, 99.0]) == "98.0 +- 1.4 (n=2)"
    assert format_mean_std([]) == "-"


def test_paper_table_prints_paper_ours_and_difference(tmp_path):
    rows = [PaperRow("T1", "AUROC vs mnist", 98.7, [97.0, 98.0]),
            PaperRow("T1", "AUROC vs omniglot", None, [], note="not reachable")]
    text = paper_table(rows)
    assert "98.7" in text and "97.5 +- 0.7 (n=2)" in text and "-1.2" in text and "not run" in text
    paths = write_table(str(tmp_path), "t", rows, {"command": "python x.py"})
    data = json.load(open(paths["json"]))
    assert data["rows"][0]["difference"] == pytest.approx(-1.2) and data["meta"]["command"] == "python x.py"
    assert "| T1 | AUROC vs mnist | 98.7 |" in open(paths["md"]).read()


def test_report_plots_the_rows_with_a_paper_value(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastood.protocol import plot_paper_rows, report

    rows = [PaperRow("T1", "AUROC vs mnist", 98.7, [97.0, 98.0]),
            PaperRow("T1", "AUROC vs omniglot", None, [], note="not reachable")]
    paths = report(str(tmp_path), "t", rows, {"command": "python x.py"})
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n" and "t.png" in capsys.readouterr().out
    assert plot_paper_rows([rows[1]], str(tmp_path / "none.png")) is None  # nothing to compare: no file
    assert not (tmp_path / "none.png").exists()


def test_vernekar_networks_match_the_authors_layers():
    cnn = VernekarCNN(11)
    assert cnn(torch.zeros(3, 1, 28, 28)).shape == (3, 11)
    # Keras summary of the authors' classifier with 11 outputs: 320 + 18,496 + 1,179,776 + 1,419 parameters.
    assert sum(p.numel() for p in cnn.parameters()) == 320 + 18496 + 1179776 + 1419
    cvae = VernekarCVAE(num_classes=10, latent_dim=8)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    recon, mu, logvar = cvae(x, torch.arange(4))
    assert recon.shape == x.shape and mu.shape == (4, 8)
    # The notebooks train the decoder on the mean encoding (their sampling() returns z_mean).
    assert not cvae.latent_noise and torch.equal(recon, cvae.decode(mu, torch.arange(4)))
    assert VernekarCVAE(10, 8, latent_noise=True).latent_noise
    # Decoder: Dense(18 -> 3136) + ConvT(64, 64, 3) + ConvT(64, 32, 3) + ConvT(32, 1, 3), as the notebook's.
    dec = sum(p.numel() for m in (cvae.decoder_fc, cvae.decoder_conv) for p in m.parameters())
    assert dec == (18 * 3136 + 3136) + (64 * 64 * 9 + 64) + (64 * 32 * 9 + 32) + (32 * 9 + 1)
    with pytest.raises(ValueError, match="num_outputs"):
        VernekarCNN(0)
