"""Records pytorch-ood's ViM, ASH (P/B/S), DICE, RMD and GEN outputs on fixed small inputs, for
tests/test_detectors_posthoc_b.py (which does not need pytorch-ood).

Run in a throwaway environment that has pytorch-ood, from the repository root, e.g.
    /work/main/.venv/bin/python -m venv /tmp/refvenv-b
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/refvenv-b/lib/python3.11/site-packages/main.pth
    /tmp/refvenv-b/bin/pip install --no-deps pytorch-ood==0.4.0      # torch 2.13.0 from the project's venv
    /tmp/refvenv-b/bin/python tests/data/reference_detectors/make_pytorch_ood_posthoc_b.py
It writes pytorch_ood_posthoc_b.json next to this file: the inputs themselves (rounded to 6 decimals, so the JSON
is the whole recipe), the outputs, and the versions and command that produced them.
"""
import json
import os
import sys

import torch

import pytorch_ood
from pytorch_ood.detector import ASH, DICE, GEN, RMD, ViM

F, C, N_TRAIN, N_TEST = 16, 3, 60, 12


def rounded(t):
    return torch.round(t.double() * 1e6) / 1e6


def main():
    g = torch.Generator().manual_seed(20)
    # Non-negative, ReLU-like penultimate features with a class-dependent mean (so the Gaussians differ).
    y_train = torch.arange(N_TRAIN) % C
    class_shift = torch.rand(C, F, generator=g) * 2
    z_train = rounded(torch.relu(torch.randn(N_TRAIN, F, generator=g) + class_shift[y_train]) + 0.05)
    z_test = rounded(torch.relu(torch.randn(N_TEST, F, generator=g) * 1.5 + 0.5) + 0.05)
    w = rounded(torch.randn(C, F, generator=g) * 0.5)
    b = rounded(torch.randn(C, generator=g) * 0.3)
    logits_gen = rounded(torch.randn(N_TEST, 5, generator=g) * 2)  # GEN: moderate logits, p well above 1e-7

    out = {}
    vim = ViM(None, d=8, w=w.float(), b=b.float()).fit_features(z_train.float(), y_train)
    out["vim_d8"] = vim.predict_features(z_test.float()).double().tolist()
    out["vim_d8_alpha"] = float(vim.alpha)

    def backbone(x):
        return x.reshape(x.shape[0], F, 1, 1)

    def head(x):
        return x.flatten(1).double() @ w.T + b

    for variant in ("ash-p", "ash-b", "ash-s"):
        for pct in (0.65, 0.9):
            det = ASH(backbone, head, variant=variant, percentile=pct)
            out[f"{variant}_{int(round(pct * 100))}"] = det.predict(z_test).double().tolist()

    for p in (0.5, 0.9):
        dice = DICE(None, w=w.float(), b=b.float(), p=p).fit_features(z_train.float(), y_train)
        out[f"dice_{int(round(p * 100))}"] = dice.predict_features(z_test.float()).double().tolist()
        out[f"dice_{int(round(p * 100))}_kept"] = int((dice.masked_w != 0).sum())

    rmd = RMD(None).fit_features(z_train.float(), y_train)
    out["rmd"] = rmd.predict_features(z_test.float()).double().tolist()

    out["gen_gamma0.1_M3"] = GEN.score(logits_gen, gamma=0.1, M=3).tolist()
    out["gen_gamma0.5_all"] = GEN.score(logits_gen, gamma=0.5, M=None).tolist()

    record = {
        "produced_by": "/tmp/refvenv-b/bin/python tests/data/reference_detectors/make_pytorch_ood_posthoc_b.py (a venv "
                       "with pytorch-ood 0.4.0 installed --no-deps over the project venv's torch; see the script's "
                       "docstring)",
        "pytorch_ood_version": pytorch_ood.__version__,
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "recipe": "torch.Generator().manual_seed(20); see main() in the script; the inputs below are the exact "
                  "values used (rounded to 6 decimals before use)",
        "calls": {
            "vim_d8": "ViM(None, d=8, w, b).fit_features(z_train, y_train).predict_features(z_test) (float32)",
            "ash-*_P": "ASH(backbone=z -> z[B, F, 1, 1], head=z -> z W^T + b, variant, percentile=P/100)"
                       ".predict(z_test)",
            "dice_P": "DICE(None, w, b, p=P/100).fit_features(z_train, y_train).predict_features(z_test) (float32)",
            "rmd": "RMD(None).fit_features(z_train, y_train).predict_features(z_test) (float32)",
            "gen_*": "GEN.score(logits_gen, gamma, M) (mean over the top M, p clamped to [1e-7, 1 - 1e-7])",
        },
        "inputs": {"z_train": z_train.tolist(), "y_train": y_train.tolist(), "z_test": z_test.tolist(),
                   "w": w.tolist(), "b": b.tolist(), "logits_gen": logits_gen.tolist()},
        "outputs": out,
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pytorch_ood_posthoc_b.json")
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
