"""bench/reproduce_vernekar.py --quick on a tiny budget: the table, the files and the cached cells (resume)."""
import json
import os
import subprocess
import sys

import pytest

from fastood.data import real

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not real.available("mnist"),
                                reason="full MNIST not in the data root: run `fastood data fetch` (or make data)")


def test_reproduce_vernekar_quick_writes_the_table_and_resumes(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce_vernekar.py"), "--quick", "--sets", "mnist-0to4",
           "--train-n", "256", "--eval-n", "64", "--out", str(tmp_path), "--quiet", "--threads", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "AUROC vs mnist-5to9" in first.stdout and "93.8" in first.stdout
    table = json.load(open(tmp_path / "vernekar_table.json"))
    row = next(r for r in table["rows"] if r["row"].startswith("AUROC vs mnist-5to9"))
    assert row["paper"] == 93.8 and row["n"] == 1 and 0 <= row["mean"] <= 100
    assert "classifier 1 epochs" in table["meta"]["budget"]
    # the authors' generator by default: mean-latent CVAE, type-II shell 1.5, the notebooks' ellipsoid factor
    assert "mean latent" in table["meta"]["budget"] and "shell 1.5, authors ellipsoid" in table["meta"]["budget"]
    cells = os.listdir(tmp_path / "cells")
    assert len(cells) == 1
    # A second run finds the cell and trains nothing.
    second = subprocess.run(cmd[:-2] + ["--threads", "1"], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and json.load(open(tmp_path / "vernekar_table.json"))["rows"][0]["ours"] == \
        table["rows"][0]["ours"]


def test_reproduce_vernekar_rejects_a_shell_below_one(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "reproduce_vernekar.py"), "--quick", "--shell", "0.5",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--shell must be a finite factor >= 1, got 0.5" in run.stderr
