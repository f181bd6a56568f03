"""bench/sign_agreement.py: the sign comparison it reports, and that it compares at every update of a real
sampler run (the trajectory stays float32's)."""
import os
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import sign_agreement  # noqa: E402
from fastood.samplers.langevin import LangevinSampler  # noqa: E402


def test_compare_signs_counts_all_and_above_median_coordinates():
    g32 = torch.tensor([[4.0, -3.0, 2.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    glow = torch.tensor([[4.0, -3.0, -2.0, 0.0], [-1.0, 2.0, 3.0, 4.0]])
    r = sign_agreement.compare_signs(g32, glow)
    # row 0: signs agree on 4, -3; differ on 2 (flipped) and -1 (zero); above the median (2.5): 4, -3 -> both agree
    # row 1: differ on 1 only; above the median (2.5): 3, 4 -> agree
    assert r["coords"] == 8 and r["agree"] == 5 and r["big"] == 4 and r["agree_big"] == 4 and r["zero"] == 1
    s = sign_agreement.summarize([r])
    assert s["agree"] == 5 / 8 and s["agree_above_median"] == 1.0 and s["zero"] == 1 / 8


def test_comparing_sampler_records_every_update_and_keeps_the_float32_trajectory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    kw = dict(max_steps=4, early_stop=None)
    torch.manual_seed(1)
    plain = LangevinSampler(precision="fp32", **kw).sample(model, 6, (1, 6, 6))
    torch.manual_seed(1)
    comparing = sign_agreement.ComparingSampler({"bf16": torch.bfloat16}, **kw)
    got = comparing.sample(model, 6, (1, 6, 6))
    assert torch.equal(got, plain)
    records = comparing.records["bf16"]
    assert len(records) == 4 and all(r["chains"] == 6 and r["coords"] == 6 * 36 for r in records)
    assert all(0.5 < r["agree"] / r["coords"] <= 1.0 for r in records)
