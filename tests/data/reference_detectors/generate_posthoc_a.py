"""Record pytorch-ood's outputs for KNN, ReAct, OpenMax and Gram on fixed small inputs (issue 20, section 2).

Run in a throwaway environment that has pytorch-ood (never a fastood dependency):

    python3 -m venv /tmp/refvenv-a
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/refvenv-a/lib/python3.11/site-packages/main.pth
    /tmp/refvenv-a/bin/pip install --no-deps pytorch-ood==0.4.0          # torch, numpy, scipy from fastood's venv
    /tmp/refvenv-a/bin/python tests/data/reference_detectors/generate_posthoc_a.py

It writes ``posthoc_a.json`` next to itself: the inputs themselves (so the test needs neither this script's random
draws nor pytorch-ood), each detector's settings and its scores. ``tests/test_detectors_posthoc_a.py`` compares
fastood's detectors with them.
"""
import json
import os
import sys

import numpy as np
import torch
from torch import nn

import pytorch_ood
from pytorch_ood.detector import KNN, Gram, OpenMax, ReAct


def rounded(t):
    return torch.as_tensor(t, dtype=torch.float32).tolist()


def main():
    gen = torch.Generator().manual_seed(20)
    out = {"command": "python tests/data/reference_detectors/generate_posthoc_a.py (pytorch-ood in a separate venv)",
           "pytorch_ood_version": pytorch_ood.__version__, "torch_version": torch.__version__,
           "numpy_version": np.__version__, "python": sys.version.split()[0]}

    # ---- features for KNN / ReAct: 3 Gaussian clusters in 8-d (ReLU'd for ReAct), 90 train, 12 test (4 far away)
    centers = torch.randn(3, 8, generator=gen) * 2
    y_train = torch.arange(90) % 3
    z_train = centers[y_train] + torch.randn(90, 8, generator=gen)
    z_test = torch.cat([centers[torch.arange(8) % 3] + torch.randn(8, 8, generator=gen),
                        torch.randn(4, 8, generator=gen) * 4])
    z_train, z_test = z_train.float(), z_test.float()
    head = nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, 8, generator=gen))
        head.bias.copy_(torch.randn(3, generator=gen))
    out["features"] = {"recipe": "torch.Generator().manual_seed(20): centers = randn(3, 8) * 2; train = centers[i % 3] "
                                 "+ randn (90); test = 8 near the centers + 4 randn * 4; head = Linear(8, 3) with randn "
                                 "weight / bias",
                       "train": rounded(z_train), "train_labels": y_train.tolist(), "test": rounded(z_test),
                       "head_weight": rounded(head.weight), "head_bias": rounded(head.bias)}

    knn = KNN(encoder=None, k=5).fit_features(z_train, y_train)
    out["knn"] = {"settings": "KNN(encoder=None, k=5).fit_features(train, labels).predict_features(test)",
                  "k": 5, "scores": knn.predict_features(z_test).tolist()}

    relu_train, relu_test = torch.relu(z_train), torch.relu(z_test)
    react = ReAct(backbone=nn.Identity(), head=head, percentile=0.9).fit_feature_maps(relu_train, y_train)
    with torch.no_grad():
        react_scores = react.predict_feature_maps(relu_test)
    out["react"] = {"settings": "ReAct(backbone=Identity, head=head, percentile=0.9).fit_feature_maps(relu(train)); "
                                "predict_feature_maps(relu(test)) (energy score)",
                    "percentile": 90, "threshold": react.threshold, "scores": react_scores.tolist()}

    # ---- logits for OpenMax: 4 classes, 160 train (40 per class), 10 test
    means = torch.randn(4, 4, generator=gen) * 3
    y_logit = torch.arange(160) % 4
    logits_train = (means[y_logit] + torch.randn(160, 4, generator=gen)).float()
    logits_test = torch.cat([means[torch.arange(6) % 4] + torch.randn(6, 4, generator=gen),
                             torch.randn(4, 4, generator=gen)]).float()
    om = OpenMax(model=None, tailsize=20, alpha=3, euclid_weight=1.0).fit_logits(logits_train, y_logit)
    out["openmax"] = {"recipe": "same generator, next: means = randn(4, 4) * 3; train logits = means[i % 4] + randn "
                                "(160); test = 6 near the means + 4 randn",
                      "settings": "OpenMax(model=None, tailsize=20, alpha=3, euclid_weight=1.0)",
                      "tail_size": 20, "alpha": 3, "train": rounded(logits_train), "train_labels": y_logit.tolist(),
                      "test": rounded(logits_test), "scores": om.predict_logits(logits_test).tolist(),
                      "weibull": {"note": "per class: scipy exponweib.fit shape c, scale, and the tail minimum "
                                          "(libMR translation 10000)",
                                  "shape": [float(om._openmax.distributions[c].c) for c in range(4)],
                                  "scale": [float(om._openmax.distributions[c].scale) for c in range(4)],
                                  "tail_min": [float(om._openmax.distributions[c].min_val) for c in range(4)]}}

    # ---- Gram: a tiny CNN, 2 feature layers, orders 1..4, no validation split (layer norms 1)
    conv1, conv2 = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        for p in list(conv1.parameters()) + list(conv2.parameters()) + list(lin.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    images = torch.rand(36, 1, 6, 6, generator=gen) * 2 - 1
    y_img = torch.arange(36) % 3
    test_images = torch.cat([torch.rand(6, 1, 6, 6, generator=gen) * 2 - 1, torch.randn(4, 1, 6, 6, generator=gen) * 2])
    block2 = nn.Sequential(nn.ReLU(), conv2)
    gram_head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    gram = Gram(head=gram_head, feature_layers=[conv1, block2], num_classes=3, num_poles_list=[1, 2, 3, 4])
    gram.validation_fraction = 0.0   # no held-out split: every layer norm is 1 (fastood: normalize=False)
    gram.fit([(images[:20], y_img[:20]), (images[20:], y_img[20:])])
    with torch.no_grad():
        gram_scores = gram.predict(test_images)
    out["gram"] = {"recipe": "same generator, next: conv1 = Conv2d(1, 3, 3, padding=1), conv2 = Conv2d(3, 4, 3, "
                             "padding=1), lin = Linear(4, 3), every parameter randn * 0.5; model = conv1, ReLU, conv2, "
                             "ReLU, AdaptiveAvgPool2d(1), Flatten, lin; train = rand(36, 1, 6, 6) * 2 - 1 with labels "
                             "i % 3; test = 6 rand * 2 - 1 + 4 randn * 2",
                   "settings": "Gram(head, feature_layers=[conv1, Sequential(ReLU, conv2)], num_classes=3, "
                               "num_poles_list=[1, 2, 3, 4]) with validation_fraction = 0; fit on two batches",
                   "orders": [1, 2, 3, 4],
                   "conv1_weight": rounded(conv1.weight), "conv1_bias": rounded(conv1.bias),
                   "conv2_weight": rounded(conv2.weight), "conv2_bias": rounded(conv2.bias),
                   "lin_weight": rounded(lin.weight), "lin_bias": rounded(lin.bias),
                   "train": rounded(images), "train_labels": y_img.tolist(), "test": rounded(test_images),
                   "scores": gram_scores.tolist(), "layer_norm": gram.layer_norm.tolist()}

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "posthoc_a.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
