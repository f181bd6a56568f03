"""ViM, ASH, GEN, DICE and relative Mahalanobis (issue 20): each paper's equation computed here independently
(float64, hand-sized), streaming fits, errors, and agreement with pytorch-ood's recorded outputs."""
import json
import math
import os

import numpy as np
import pytest
import torch
from op_helpers import DEVICES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import (ASH, DETECTORS, DICE, GEN, Mahalanobis, RelativeMahalanobis, ViM,
                               tune_detector)
from fastood.detectors.vim import default_principal_dim

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "reference_detectors", "pytorch_ood_posthoc_b.json")


def linear_model(weight, bias):
    """``nn.Sequential(Flatten, Linear)`` in float64: the penultimate features are the input itself."""
    weight, bias = torch.as_tensor(weight, dtype=torch.float64), torch.as_tensor(bias, dtype=torch.float64)
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0])).double()
    with torch.no_grad():
        net[1].weight.copy_(weight)
        net[1].bias.copy_(bias)
    return net


def logsumexp(a):
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


@pytest.fixture
def toy():
    """Training features z [40, 5] (3 classes, non-negative), test features [6, 5], W [3, 5], b [3]."""
    g = torch.Generator().manual_seed(3)
    y = torch.arange(40) % 3
    z = torch.relu(torch.randn(40, 5, generator=g, dtype=torch.float64)
                   + torch.rand(3, 5, generator=g, dtype=torch.float64)[y] * 2) + 0.1
    q = torch.relu(torch.randn(6, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3) + 0.1
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    return z, y, q, w, b


# ---------------------------------------------------------------------------- ViM
def test_vim_matches_the_papers_equation(toy):
    z, y, q, w, b = toy
    det = ViM(linear_model(w, b), D=2).fit(DataLoader(TensorDataset(z, y), batch_size=40))
    Z, Q, W, B = z.numpy(), q.numpy(), w.numpy(), b.numpy()
    u = -np.linalg.pinv(W) @ B                                    # origin: W u + b = 0 (least squares)
    cov = (Z - u).T @ (Z - u) / len(Z)                            # second moment around u, not the mean
    vals, vecs = np.linalg.eigh(cov)
    R = vecs[:, np.argsort(vals)[:3]]                             # the 5 - D = 3 smallest directions
    alpha = (Z @ W.T + B).max(1).sum() / np.linalg.norm((Z - u) @ R, axis=1).sum()
    want = alpha * np.linalg.norm((Q - u) @ R, axis=1) - logsumexp(Q @ W.T + B)
    np.testing.assert_allclose(det.alpha, alpha, rtol=1e-10)
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-5, atol=1e-5)
    # the paper's probability of the virtual class is sigmoid(score): same ranking
    virtual_prob = 1 / (1 + np.exp(-want))
    assert (np.argsort(virtual_prob) == np.argsort(det.score(q).numpy())).all()
    assert torch.equal(det.predict_class(q), (q @ w.T + b).argmax(1))
    # a seeded wrong formula (principal = the smallest directions) gives other scores
    R_wrong = vecs[:, np.argsort(vals)[2:]]
    alpha_w = (Z @ W.T + B).max(1).sum() / np.linalg.norm((Z - u) @ R_wrong, axis=1).sum()
    wrong = alpha_w * np.linalg.norm((Q - u) @ R_wrong, axis=1) - logsumexp(Q @ W.T + B)
    assert np.abs(wrong - det.score(q).numpy()).max() > 1e-2


def test_vim_default_dimension_rule_and_streaming_fit(toy):
    assert [default_principal_dim(n) for n in (4096, 2048, 1024, 768, 512, 5)] == [1000, 1000, 512, 512, 256, 2]
    z, y, q, w, b = toy
    net = linear_model(w, b)
    assert ViM(net).D == 2 and ViM(net).grid == {"D": [1, 2, 3]}
    one = ViM(net).fit([(z, y)])
    two = ViM(net).fit([(z[:17], y[:17]), (z[17:], y[17:])])
    unlabeled = ViM(net).fit([z[:9], z[9:]])                       # labels are not needed
    for other in (two, unlabeled):
        assert math.isclose(one.alpha, other.alpha, rel_tol=1e-12)
        torch.testing.assert_close(other.score(q), one.score(q), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="reads the loader twice.*generator"):
        ViM(net).fit(x for x in [z[:20], z[20:]])
    refit = one.replace(D=3)
    assert refit.alpha is None and one.alpha is not None
    with pytest.raises(RuntimeError, match="not fitted"):
        refit.score(q)


# ---------------------------------------------------------------------------- ASH
ASH_X = [0.1, 0.5, 0.3, 0.9, 0.2, 0.7, 0.4, 0.8, 0.6, 1.0]  # n = 10, sum 5.5


@pytest.mark.parametrize("variant, percentile, shaped", [
    # percentile 65: k = 10 - round(6.5) = 4 (round half to even) -> keep 1.0, 0.9, 0.8, 0.7 (sum 3.4)
    ("p", 65, [0, 0, 0, 0.9, 0, 0.7, 0, 0.8, 0, 1.0]),
    ("b", 65, [0, 0, 0, 1.375, 0, 1.375, 0, 1.375, 0, 1.375]),              # 5.5 / 4
    ("s", 65, [v * math.exp(5.5 / 3.4) for v in [0, 0, 0, 0.9, 0, 0.7, 0, 0.8, 0, 1.0]]),
    # percentile 90: k = 10 - 9 = 1 -> keep 1.0
    ("p", 90, [0] * 9 + [1.0]),
    ("b", 90, [0] * 9 + [5.5]),
    ("s", 90, [0] * 9 + [math.exp(5.5)]),
])
def test_ash_shapes_as_the_paper_then_scores_energy(variant, percentile, shaped):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.tensor([ASH_X], dtype=torch.float64)
    logits = torch.tensor([shaped], dtype=torch.float64) @ w.T + b
    want = -torch.logsumexp(logits, dim=1)
    det = ASH(linear_model(w, b), variant=variant, percentile=percentile)
    torch.testing.assert_close(det.score(x).double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(det.predict_class(x), logits.argmax(1))
    assert det.name == f"ASH(variant={variant!r}, percentile={percentile})"


def test_ash_shapes_a_named_feature_map_over_all_its_elements():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        a = net[1](net[0](x))                                          # [5, 3, 4, 4]: n = 48 per sample
        flat = a.flatten(1).double()
        k = 48 - round(48 * 0.8)                                       # 10 kept
        kept = flat.topk(k, dim=1)
        pruned = torch.zeros_like(flat).scatter(1, kept.indices, kept.values)
        scaled = pruned * torch.exp(flat.sum(1, keepdim=True) / pruned.sum(1, keepdim=True))
        logits = net[2:](scaled.reshape(a.shape).float())
    det = ASH(net, "ash-S", percentile=80, layer="1")
    torch.testing.assert_close(det.score(x), -torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
    assert det.variant == "s" and "layer='1'" in det.name


# ---------------------------------------------------------------------------- GEN
def test_gen_matches_the_generalized_entropy():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.3, 0.2, 0.1, 0.0], [5.0, -2.0, 3.0, 1.0]])
    logits = logits.double()  # the float32 values nn.Identity (no parameters: float32 inputs) passes on
    p = np.sort(torch.softmax(logits, 1).numpy(), axis=1)[:, ::-1]   # descending
    for gamma, M in [(0.1, 2), (0.5, 4), (2.0, 1)]:
        want = (p[:, :M] ** gamma * (1 - p[:, :M]) ** gamma).sum(1)  # the M largest probabilities
        got = GEN(nn.Identity(), gamma=gamma, M=M).score(logits)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # M larger than the number of classes: every class
    np.testing.assert_allclose(GEN(nn.Identity()).score(logits).numpy(),
                               (p ** 0.1 * (1 - p) ** 0.1).sum(1), rtol=1e-12)
    # higher = more OOD: the flat row scores above the peaked one
    s = GEN(nn.Identity()).score(logits)
    assert s[1] > s[0] > s[2]


def test_gen_keeps_confident_inputs_apart():
    gaps = torch.tensor([40.0, 50.0, 60.0], dtype=torch.float64)
    logits = torch.stack([torch.zeros(3, dtype=torch.float64), -gaps, -gaps - 10], 1)
    got = GEN(nn.Identity(), gamma=0.1, M=3).score(logits)
    want = []
    for g in gaps.tolist():
        e = [1.0, math.exp(-g), math.exp(-g - 10)]
        s = sum(e)
        complement = [(e[1] + e[2]) / s, (s - e[1]) / s, (s - e[2]) / s]   # 1 - p_max = (e1 + e2) / s
        want.append(sum((ei / s) ** 0.1 * c ** 0.1 for ei, c in zip(e, complement)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    naive = (torch.softmax(logits, 1) ** 0.1 * (1 - torch.softmax(logits, 1)) ** 0.1).sum(1)
    # plain float64 rounds 1 - p_max to 0 and loses the argmax's term, ~(e^-gap)^0.1: 42% of the score at gap 40
    torch.testing.assert_close(got - naive, torch.exp(-0.1 * gaps), rtol=1e-3, atol=0)
    assert bool((got.diff() < 0).all())  # distinct and ordered by confidence


# ---------------------------------------------------------------------------- DICE
def test_dice_matches_the_papers_sparsified_energy(toy):
    z, y, q, w, b = toy
    det = DICE(linear_model(w, b), p=0.7).fit([(z, y)])
    mean = z.numpy().mean(0)
    V = mean[None, :] * w.numpy()                                   # contribution of each weight [3, 5]
    threshold = np.percentile(V, 70)
    M = V > threshold
    assert M.sum() == 15 - 1 - math.floor(0.7 * 14)                 # 5 of 15 kept
    want = -logsumexp(q.numpy() @ (M * w.numpy()).T + b.numpy())
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(det.mean_activation.numpy(), mean, rtol=1e-12)
    assert torch.equal(det.predict_class(q), torch.from_numpy((q.numpy() @ (M * w.numpy()).T + b.numpy()).argmax(1)))
    # the mask keeps the LARGEST contributions (a seeded wrong order gives other scores)
    wrong = -logsumexp(q.numpy() @ (~M * w.numpy()).T + b.numpy())
    assert np.abs(wrong - want).max() > 1e-2
    # replace(p=...) re-masks without refitting; p = 0 keeps all but the smallest contribution
    dense = det.replace(p=0.0)
    assert dense.mean_activation is det.mean_activation
    assert int((dense.masked_weight() != 0).sum()) == 14
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-5)   # the original keeps its own mask


def test_dice_streaming_fit_equals_one_batch(toy):
    z, y, q, w, b = toy
    net = linear_model(w, b)
    one = DICE(net).fit([(z, y)])
    two = DICE(net).fit(DataLoader(TensorDataset(z, y), batch_size=15))
    torch.testing.assert_close(two.mean_activation, one.mean_activation, rtol=1e-13, atol=0)
    torch.testing.assert_close(two.score(q), one.score(q))


# ---------------------------------------------------------------------------- relative Mahalanobis
def _rmd_numpy(Z, Y, Q):
    classes = np.unique(Y)
    means = np.stack([Z[Y == c].mean(0) for c in classes])
    within = Z - means[Y]
    prec = np.linalg.pinv(within.T @ within / len(Z), hermitian=True)
    mu0 = Z.mean(0)
    prec0 = np.linalg.pinv((Z - mu0).T @ (Z - mu0) / len(Z), hermitian=True)
    md = np.stack([np.einsum("bf,fg,bg->b", Q - m, prec, Q - m) for m in means], 1)
    md0 = np.einsum("bf,fg,bg->b", Q - mu0, prec0, Q - mu0)
    return (md - md0[:, None]).min(1)


def test_relative_mahalanobis_matches_the_papers_equation(toy):
    z, y, q, w, b = toy
    net = linear_model(w, b)
    det = RelativeMahalanobis(net).fit([(z, y)])
    want = _rmd_numpy(z.numpy(), y.numpy(), q.numpy())
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-5, atol=1e-5)
    # differs from plain Mahalanobis by the background distance, per sample
    plain = Mahalanobis(net).fit([(z, y)]).score(q).double()
    assert (plain - det.score(q).double()).min() > 0.1
    assert torch.equal(det.predict_class(q), net(q).argmax(1))
    assert det.name == "RelativeMahalanobis" and det.hyperparameters == ()


def test_relative_mahalanobis_streaming_fit_on_a_named_conv_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    x = torch.randn(48, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(48) % 2
    one = RelativeMahalanobis(net, layer="0").fit([(x, y)])
    two = RelativeMahalanobis(net, layer="0").fit(DataLoader(TensorDataset(x, y), batch_size=10))
    q = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(two.score(q), one.score(q), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        pooled, pooled_q = net[0](x).mean(dim=(2, 3)).numpy(), net[0](q).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(one.score(q).numpy(), _rmd_numpy(pooled, y.numpy(), pooled_q), rtol=1e-5, atol=1e-5)
    assert one.name == "RelativeMahalanobis(layer='0')"


# ---------------------------------------------------------------------------- errors, registry, torchvision
def test_errors_name_the_problem(toy):
    z, y, q, w, b = toy
    net = linear_model(w, b)
    for det in (ViM(net), DICE(net), RelativeMahalanobis(net)):
        with pytest.raises(RuntimeError, match="not fitted: call fit"):
            det.score(q)
    headless = nn.Sequential(nn.Linear(5, 5), nn.ReLU())
    for cls in (ViM, DICE, ASH, RelativeMahalanobis):
        with pytest.raises(TypeError, match="cannot find the model's penultimate layer.*must end in nn.Linear"):
            cls(headless)
    with pytest.raises(ValueError, match=r"layers \['nope'\] not found"):
        ASH(net, layer="nope")
    with pytest.raises(ValueError, match=r"layers \['nope'\] not found"):
        RelativeMahalanobis(net, layer="nope")
    for cls in (ViM, DICE):
        with pytest.raises(ValueError, match="head must name an nn.Linear submodule.*'nope'"):
            cls(net, head="nope")
        with pytest.raises(TypeError, match="head '0' must be an nn.Linear, got Flatten"):
            cls(net, head="0")
    with pytest.raises(ValueError, match=r"D must be an int with 1 <= D < 5"):
        ViM(net, D=5)
    with pytest.raises(ValueError, match="variant must be one of"):
        ASH(net, variant="q")
    with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\)"):
        ASH(net, percentile=100)
    with pytest.raises(ValueError, match="prunes all 5 activations"):
        ASH(net, percentile=95).score(q)                             # k = 5 - round(4.75) = 0
    with pytest.raises(ValueError, match="gamma must be a number > 0"):
        GEN(net, gamma=0)
    with pytest.raises(ValueError, match="M must be an int >= 1"):
        GEN(net, M=0)
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\)"):
        DICE(net, p=1.0)
    for det in (ViM(net), DICE(net), RelativeMahalanobis(net)):
        with pytest.raises(ValueError, match="no samples"):
            det.fit([])
    with pytest.raises(ValueError, match="without labels"):
        RelativeMahalanobis(net).fit([z])


def test_registry_and_callable(toy):
    z, y, q, w, b = toy
    assert {k: DETECTORS[k] for k in ("vim", "ash", "gen", "dice", "relativemahalanobis")} == {
        "vim": ViM, "ash": ASH, "gen": GEN, "dice": DICE, "relativemahalanobis": RelativeMahalanobis}
    net = linear_model(w, b)
    for det in (ViM(net).fit([z]), ASH(net), GEN(net), DICE(net).fit([z]), RelativeMahalanobis(net).fit([(z, y)])):
        assert torch.equal(det(q), det.score(q)) and det.score(q).shape == (6,)
        assert det.score_loader([q[:4], q[4:]]).shape == (6,)


@pytest.mark.parametrize("device", DEVICES)
def test_fit_and_score_on_the_model_device(toy, device):
    z, y, q, w, b = toy
    net = linear_model(w, b)
    moved = linear_model(w, b).to(device)
    for make, fit in [(ViM, True), (ASH, False), (GEN, False), (DICE, True), (RelativeMahalanobis, True)]:
        on_cpu, on_device = make(net), make(moved)
        if fit:
            on_cpu.fit([(z, y)])
            on_device.fit([(z, y)])                 # batches are moved to the model's device
        s = on_device.score(q)
        assert s.device.type == device
        torch.testing.assert_close(s.cpu(), on_cpu.score(q), rtol=1e-5, atol=1e-5)


def test_tune_dice_sparsity_by_replace(toy):
    z, y, q, w, b = toy
    fitted = DICE(linear_model(w, b)).fit([z])
    best, params, results = tune_detector(lambda **p: fitted.replace(**p), {"p": DICE.grid["p"]}, [z[:20]], [q])
    assert [r[0]["p"] for r in results] == DICE.grid["p"] and best.p == params["p"]


def test_torchvision_resnet_features_by_hooks():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3).eval()    # resnet18's layout, one block per stage
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6) % 3
    with torch.no_grad():
        feats = torch.flatten(net.avgpool(net.layer4(net.layer3(net.layer2(net.layer1(
            net.maxpool(net.relu(net.bn1(net.conv1(x))))))))), 1).double()
    det = DICE(net, p=0.5).fit([(x[:4], y[:4]), (x[4:], y[4:])])
    torch.testing.assert_close(det.mean_activation, feats.mean(0), rtol=1e-5, atol=1e-6)
    vim = ViM(net, D=4).fit([(x, y)])
    assert vim.D == 4 and vim.residual.shape == (512, 508)
    for d in (det, vim, ASH(net), ASH(net, layer="layer4"), RelativeMahalanobis(net, layer="layer3").fit([(x, y)])):
        s = d.score(x[:3])
        assert s.shape == (3,) and bool(torch.isfinite(s).all())


# ---------------------------------------------------------------------------- pytorch-ood reference
def test_agreement_with_recorded_pytorch_ood_outputs():
    with open(REFERENCE) as fh:
        ref = json.load(fh)
    assert ref["pytorch_ood_version"] == "0.4.0"
    inp, out = ref["inputs"], ref["outputs"]
    z, y = torch.tensor(inp["z_train"], dtype=torch.float64), torch.tensor(inp["y_train"])
    q = torch.tensor(inp["z_test"], dtype=torch.float64)
    net = linear_model(inp["w"], inp["b"])
    train = [(z[:25], y[:25]), (z[25:], y[25:])]
    close = dict(rtol=1e-4, atol=1e-4)  # pytorch-ood computes in float32

    vim = ViM(net, D=8).fit(train)
    assert math.isclose(vim.alpha, out["vim_d8_alpha"], rel_tol=1e-5)
    torch.testing.assert_close(vim.score(q).double(), torch.tensor(out["vim_d8"], dtype=torch.float64), **close)
    for variant in "pbs":
        for pct in (65, 90):
            want = torch.tensor(out[f"ash-{variant}_{pct}"], dtype=torch.float64)    # energy = -logsumexp
            torch.testing.assert_close(ASH(net, variant, pct).score(q).double(), want, **close)
    for p in (50, 90):
        dice = DICE(net, p=p / 100).fit(train)
        assert int((dice.masked_weight() != 0).sum()) == out[f"dice_{p}_kept"]
        torch.testing.assert_close(dice.score(q).double(), torch.tensor(out[f"dice_{p}"], dtype=torch.float64),
                                   **close)
    # pytorch-ood's RMD inverts unnormalized scatter matrices: its scores are fastood's / n
    rmd = RelativeMahalanobis(net).fit(train)
    torch.testing.assert_close(rmd.score(q).double() / len(z), torch.tensor(out["rmd"], dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)
    # pytorch-ood's GEN averages over the top M (fastood sums, as the paper): a factor M
    logits = torch.tensor(inp["logits_gen"], dtype=torch.float64)
    torch.testing.assert_close(GEN(nn.Identity(), 0.1, 3).score(logits) / 3,
                               torch.tensor(out["gen_gamma0.1_M3"], dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(GEN(nn.Identity(), 0.5, 100).score(logits) / 5,
                               torch.tensor(out["gen_gamma0.5_all"], dtype=torch.float64), rtol=1e-6, atol=1e-7)
