import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import (MSP, ODIN, Discrepancy, Energy, Entropy, ExtraClass, ICELikelihood, Mahalanobis,
                               MaxLogit, tune_detector)
from fastood.metrics import ood_metrics


class FixedLogits(nn.Module):
    """A 'model' whose logits are x @ W (so tests know them exactly)."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return FixedLogits(torch.randn(4, 6))


def test_logit_scores_match_hand_computation(model):
    x = torch.randn(10, 6)
    logits = x @ model.fc.weight.T
    p = logits.softmax(1)
    torch.testing.assert_close(MSP(model).score(x), -p.max(1).values)
    torch.testing.assert_close(MaxLogit(model).score(x), -logits.max(1).values)
    torch.testing.assert_close(Energy(model, T=2.0).score(x), -2.0 * torch.logsumexp(logits / 2.0, 1))
    torch.testing.assert_close(Entropy(model).score(x), -(p * p.log()).sum(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ExtraClass(model).score(x), p[:, -1])
    assert torch.equal(ExtraClass(model).predict(x), logits[:, :3].argmax(1))
    assert torch.equal(MSP(model).predict(x), logits.argmax(1))


def test_scoring_restores_mode_and_uses_no_autograd(model):
    model.train()
    s = MSP(model).score(torch.randn(3, 6))
    assert model.training and not s.requires_grad


def test_odin_perturbation_matches_manual_autograd(model):
    x = torch.randn(5, 6)
    T, eps = 10.0, 0.01
    xr = x.clone().requires_grad_()
    loss = torch.log_softmax(model(xr) / T, 1).max(1).values.sum()
    loss.backward()
    x_tilde = x + eps * xr.grad.sign()
    model.zero_grad(set_to_none=True)
    want = -torch.softmax(model(x_tilde) / T, 1).max(1).values
    det = ODIN(model, T=T, epsilon=eps)
    torch.testing.assert_close(det.score(x), want.detach())
    # The perturbation raises the (temperature-scaled) confidence of the predicted class.
    assert (det.score(x) <= ODIN(model, T=T, epsilon=0.0).score(x) + 1e-7).all()
    assert all(p.grad is None for p in model.parameters())


def test_mahalanobis_streaming_fit_equals_direct_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(90, 5)
    y = torch.arange(90) % 3
    det = Mahalanobis(net).fit(DataLoader(TensorDataset(x, y), batch_size=16))
    with torch.no_grad():
        feats = net[1](net[0](x)).double().numpy()
    means = np.stack([feats[y.numpy() == c].mean(0) for c in range(3)])
    centered = feats - means[y.numpy()]
    cov = centered.T @ centered / len(feats)
    np.testing.assert_allclose(det.means[0].numpy(), means, atol=1e-10)
    np.testing.assert_allclose(det.precisions[0].numpy(), np.linalg.pinv(cov, hermitian=True), rtol=1e-6, atol=1e-8)
    q = torch.randn(4, 5)
    with torch.no_grad():
        fq = net[1](net[0](q)).double().numpy()
    prec = np.linalg.pinv(cov, hermitian=True)
    want = np.min([[(f - m) @ prec @ (f - m) for m in means] for f in fq], axis=1)
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-4)


def test_mahalanobis_on_named_conv_layers_and_perturbation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(40, 1, 6, 6)
    y = torch.arange(40) % 2
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    det = Mahalanobis(net, layers=["0", "1"], epsilon=0.01).fit(loader)
    s = det.score(torch.randn(3, 1, 6, 6))
    assert s.shape == (3,) and torch.isfinite(s).all()
    plain = Mahalanobis(net, layers=["0", "1"]).fit(loader)
    q = torch.randn(3, 1, 6, 6)
    assert (det.score(q) <= plain.score(q) + 1e-4).all()  # the perturbation moves toward the closest class
    with pytest.raises(ValueError, match="layers"):
        Mahalanobis(net, layers=["nope"])
    with pytest.raises(RuntimeError, match="not fitted"):
        Mahalanobis(net).score(q)


def test_discrepancy_and_ice_scores():
    class Two(nn.Module):
        def forward(self, x):
            return x[:, :3], x[:, 3:]

    x = torch.randn(6, 6)
    p1, p2 = x[:, :3].softmax(1), x[:, 3:].softmax(1)
    torch.testing.assert_close(Discrepancy(Two()).score(x), (p1 - p2).abs().sum(1))
    with pytest.raises(TypeError, match="logits1, logits2"):
        Discrepancy(nn.Identity()).score(x)

    class Head(nn.Module):
        def forward(self, x):
            return -x.abs()

    h = -x.abs()
    det = ICELikelihood(Head())
    torch.testing.assert_close(det.score(x), -h.max(1).values)
    torch.testing.assert_close(det.in_distribution_probability(x), h.max(1).values.exp())


def test_score_loader_accepts_tensors_and_tuples(model):
    x = torch.randn(20, 6)
    a = MSP(model).score_loader(DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7))
    b = MSP(model).score_loader([x[:7], x[7:]])
    torch.testing.assert_close(a, b)
    assert a.shape == (20,)


def test_bad_inputs(model):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MSP("model")
    with pytest.raises(TypeError, match="floating-point"):
        MSP(model).score(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="T must be"):
        Energy(model, T=0)
    assert MSP(model).score(torch.zeros(0, 6)).shape == (0,)


def test_tune_detector_picks_best_on_validation(model):
    torch.manual_seed(1)
    id_val = [torch.randn(30, 6) * 3]
    ood_val = [torch.randn(30, 6) * 0.1]
    best, params, results = tune_detector(lambda **p: ODIN(model, **p), {"T": [1.0, 100.0], "epsilon": [0.0, 0.01]},
                                          id_val, ood_val)
    assert len(results) == 4
    assert max(r[1]["auroc"] for r in results) == ood_metrics(best.score_loader(id_val),
                                                              best.score_loader(ood_val))["auroc"]
    assert params == max(results, key=lambda r: r[1]["auroc"])[0]
