"""The paper-reproduction scripts (bench/reproduce_*.py) run end to end in their --quick mode."""
import json
import os
import subprocess
import sys

import pytest

from fastood.data.real import available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_mnist = pytest.mark.skipif(not available("mnist"), reason="MNIST is not in the data root (fastood data fetch)")


def run_script(script, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@needs_mnist
def test_reproduce_cmg_quick(tmp_path):
    out = tmp_path / "cmg"
    done = run_script("reproduce_cmg.py", "--quick", "--quiet", "--threads", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    for ext in ("txt", "md", "json", "csv"):
        assert (out / f"cmg_table.{ext}").is_file()
    table = json.loads((out / "cmg_table.json").read_text())
    rows = {r["row"]: r for r in table["rows"] if r["table"].startswith("Table 1")}
    paper = {"Softmax": 97.6, "ODIN": 98.1, "Mahalanobis": 98.4, "CMG-s": 98.3, "CMG-e": 99.0}
    for method, value in paper.items():
        row = rows[method]
        assert row["paper"] == value and row["n"] == 1
        assert 0.0 <= row["mean"] <= 100.0 and row["difference"] == pytest.approx(row["mean"] - value)
    assert "budget" in table["meta"] and "5 runs" in table["meta"]["runs"]
    cells = json.loads(next((out / "cells").glob("mnist-0to5_s0_c*_t256_ev1.json")).read_text())
    # evaluated before stage 2, then as the authors do after steps 1, 11 (--eval-every 10 in --quick) and the last
    assert cells["cmg_softmax"]["steps"] == 20 and [s for s, _ in cells["cmg_softmax"]["trajectory"]] == [0, 1, 11, 20]
    assert cells["cmg_softmax"]["best_auroc"] == max(a for _, a in cells["cmg_softmax"]["trajectory"][1:])
    assert cells["cmg_energy"]["telemetry_last50"]["m_in"] is not None
    assert 0 <= cells["cvae_active_latents"] <= 32 and cells["cvae_kl"] >= 0
    assert "Energy of the stage-1 network (CMG-e's trajectory before stage 2)" in rows
    assert "mechanism: CVAE latent dimensions in use (of 32)" in {r["row"] for r in table["rows"]}
    assert "paper" in done.stdout and "difference" in done.stdout
    # a second run finds every cell cached and trains nothing
    again = run_script("reproduce_cmg.py", "--quick", "--threads", "2", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[cached] mnist-0to5_s0" in again.stdout and "Trainer" not in again.stderr
    assert json.loads((out / "cmg_table.json").read_text())["rows"] == table["rows"]


def test_cmg_evaluations_follow_the_authors_index_modulo_rule():
    from script_loader import load_script

    next_evaluation = load_script("bench/reproduce_cmg.py").next_evaluation
    stops, step = [], 0
    while step < 70:
        step = next_evaluation(step, 20)
        stops.append(step)
    # fine_tune.py: index = step - 1 counts from 0, evaluation when index % 20 == 0
    assert stops == [s for s in range(1, 82) if (s - 1) % 20 == 0] == [1, 21, 41, 61, 81]
    assert next_evaluation(5, 20) == 21 and next_evaluation(0, 1) == 1 and next_evaluation(3, 1) == 4


def test_active_latents_counts_the_dimensions_whose_posterior_mean_varies():
    import torch

    from script_loader import load_script

    active_latents = load_script("bench/reproduce_cmg.py").active_latents

    class Encoder:
        def encode(self, x):  # dims 0-2 follow the image, 3-4 constant: a partly collapsed posterior
            mu = torch.cat([x.flatten(1)[:, :3] * 5, torch.full((x.shape[0], 2), 0.3)], 1)
            return mu, torch.zeros_like(mu)

    active, kl = active_latents(Encoder(), torch.randn(64, 1, 4, 4))
    assert active == 3
    mu = torch.cat([torch.zeros(1, 3), torch.full((1, 2), 0.3)], 1)  # KL = 1/2 sum mu^2 with unit variances
    assert kl > float(0.5 * mu.square().sum())


def test_reproduce_cmg_rejects_a_bad_budget():
    done = run_script("reproduce_cmg.py", "--stage2-steps", "0", "--out", os.devnull)
    assert done.returncode == 2 and "--stage2-steps must be >= 1, got 0" in done.stderr
    done = run_script("reproduce_cmg.py", "--cvae-kl-weight", "-1", "--out", os.devnull)
    assert done.returncode == 2 and "--cvae-kl-weight must be a finite number >= 0, got -1.0" in done.stderr
