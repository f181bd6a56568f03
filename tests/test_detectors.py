import warnings

import numpy as np
import pytest
import torch
from op_helpers import DEVICES
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import (DETECTORS, MSP, ODIN, Discrepancy, Energy, Entropy, ExtraClass, ICELikelihood,
                               Mahalanobis, MaxLogit, tune_detector, tuning_table)
from fastood.metrics import ood_metrics
from fastood.models import GaussianClassifier, GaussianHead


class FixedLogits(nn.Module):
    """logits = x.flatten(1) @ W^T (so tests know them exactly)."""

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


def _logits(model, x):
    return x.double() @ model.fc.weight.detach().double().T


# ---------------------------------------------------------------------------- logit scores
def test_logit_scores_match_hand_computation(model):
    x = torch.randn(10, 6)
    f = _logits(model, x)
    p = f.softmax(1)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(MSP(model).score(x).double(), -p.max(1).values, **close)
    torch.testing.assert_close(MaxLogit(model).score(x).double(), -f.max(1).values, **close)
    torch.testing.assert_close(Energy(model).score(x).double(), -torch.log(f.exp().sum(1)), **close)
    torch.testing.assert_close(Energy(model, T=2.0).score(x).double(), -2.0 * torch.log((f / 2).exp().sum(1)), **close)
    torch.testing.assert_close(Entropy(model).score(x).double(), -(p * p.log()).sum(1), **close)
    torch.testing.assert_close(ExtraClass(model).score(x).double(), p[:, -1], **close)
    assert torch.equal(ExtraClass(model).predict_class(x), f[:, :3].argmax(1))
    for det in (MSP(model), MaxLogit(model), Energy(model), Entropy(model)):
        assert torch.equal(det.predict_class(x), f.argmax(1))
        s = det.score(x)
        assert s.dtype == det.score_dtype and s.shape == (10,)
        assert det.score_dtype == (torch.float64 if type(det) in (MSP, Entropy) else torch.float32)


def test_energy_sees_logit_magnitude_that_softmax_scores_ignore():
    logits = torch.randn(5, 4)  # nn.Identity: the input is the logits
    shifted = logits + 5.0      # same softmax, larger logits (more ID-like for Energy and MaxLogit)
    torch.testing.assert_close(Energy(nn.Identity()).score(shifted), Energy(nn.Identity()).score(logits) - 5.0)
    torch.testing.assert_close(Energy(nn.Identity(), T=2.0).score(shifted),
                               Energy(nn.Identity(), T=2.0).score(logits) - 5.0)
    torch.testing.assert_close(MaxLogit(nn.Identity()).score(shifted), MaxLogit(nn.Identity()).score(logits) - 5.0)
    torch.testing.assert_close(MSP(nn.Identity()).score(shifted), MSP(nn.Identity()).score(logits))


def test_scoring_uses_eval_mode_restores_modes_and_no_autograd():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    net[1].eval()  # a mixed state must come back exactly
    x = torch.randn(7, 6)
    s1, s2 = MSP(net).score(x), MSP(net).score(x)
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
    with torch.no_grad():
        net.eval()
        want = -net(x).softmax(1).max(1).values
    torch.testing.assert_close(s1, want.double())  # eval mode: no dropout, running BN statistics
    assert torch.equal(s1, s2) and not s1.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_score_loader_accepts_tensors_and_tuples(model):
    x = torch.randn(20, 6)
    a = MSP(model).score_loader(DataLoader(TensorDataset(x, torch.zeros(20)), batch_size=7))
    b = MSP(model).score_loader([x[:7], x[7:]], progress=False)
    torch.testing.assert_close(a, b)
    assert a.shape == (20,) and a.device.type == "cpu"
    torch.testing.assert_close(a, MSP(model).score(x))
    scores, preds = MSP(model).score_loader_with_predictions([(x[:7], 0), (x[7:], 1)])
    assert torch.equal(preds, _logits(model, x).argmax(1))


def test_inputs_are_cast_to_the_model_dtype(model):
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(MSP(model).score(x), MSP(model).score(x.float()))
    model64 = FixedLogits(model.fc.weight.detach().double())
    torch.testing.assert_close(MaxLogit(model64).score(x.float()), -_logits(model, x.float()).max(1).values.float())


@pytest.mark.parametrize("device", DEVICES)
def test_batches_move_to_the_model_device(model, device):
    model = model.to(device)
    x = torch.randn(5, 6)  # on the CPU
    for det in (MSP(model), ODIN(model, T=10.0, epsilon=0.01)):
        s = det.score(x)
        assert s.device.type == device
        assert det.score_loader([x]).device.type == "cpu"


def test_bad_inputs(model):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        MSP("model")
    with pytest.raises(TypeError, match="floating-point"):
        MSP(model).score(torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        MSP(model).score(np.zeros((2, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="T must be"):
        Energy(model, T=0)
    with pytest.raises(ValueError, match="T must be"):
        ODIN(model, T=-1.0)
    with pytest.raises(ValueError, match="epsilon must be"):
        ODIN(model, epsilon=-0.1)
    with pytest.raises(TypeError, match="needs a model returning logits"):
        MSP(nn.Identity()).score(torch.randn(2, 3, 4))
    assert MSP(model).score(torch.zeros(0, 6)).shape == (0,)


def test_names_registry_and_replace(model):
    assert ODIN(model).name == "ODIN(T=1000, epsilon=0.0014)"
    assert MSP(model).name == "MSP"
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 2))
    assert Mahalanobis(net).name == "Mahalanobis(epsilon=0)"
    assert Mahalanobis(net, layers=["0"], epsilon=0.01).name == "Mahalanobis(epsilon=0.01, layers=['0'])"
    assert set(DETECTORS) >= {"msp", "maxlogit", "energy", "entropy", "odin", "mahalanobis", "discrepancy",
                              "extraclass", "ice"}
    det = ODIN(model, T=10.0, epsilon=0.0)
    other = det.replace(epsilon=0.01)
    assert other.epsilon == 0.01 and det.epsilon == 0.0 and other.model is model
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        det.replace(temperature=3)
    with pytest.raises(ValueError, match="epsilon must be"):
        det.replace(epsilon=-1)


# ---------------------------------------------------------------------------- ODIN
def test_odin_perturbation_matches_manual_autograd(model):
    x = torch.randn(5, 6)
    T, eps = 10.0, 0.01
    xr = x.clone().requires_grad_()
    torch.log_softmax(model(xr) / T, 1).max(1).values.sum().backward()
    x_tilde = x - eps * torch.sign(-xr.grad)  # paper Eq. 2
    model.zero_grad(set_to_none=True)
    det = ODIN(model, T=T, epsilon=eps)
    torch.testing.assert_close(det.perturb(x), x_tilde)
    with torch.no_grad():
        want = -torch.softmax(model(x_tilde) / T, 1).max(1).values
    torch.testing.assert_close(det.score(x), want)
    # The step raises the temperature-scaled confidence (lowers the score) of every input ...
    assert (det.score(x) < ODIN(model, T=T, epsilon=0.0).score(x)).all()
    # ... and never leaves parameter gradients behind.
    assert all(p.grad is None for p in model.parameters())
    # predict classifies the clean input.
    assert torch.equal(det.predict_class(x), model(x).argmax(1))


def test_odin_without_perturbation_is_temperature_scaling(model):
    x = torch.randn(6, 6)
    f = _logits(model, x)
    torch.testing.assert_close(ODIN(model, T=1000.0, epsilon=0.0).score(x).double(),
                               -(f / 1000).softmax(1).max(1).values, rtol=1e-6, atol=1e-7)


def test_odin_works_under_no_grad_and_inference_mode(model):
    x = torch.randn(4, 6)
    det = ODIN(model, T=5.0, epsilon=0.02)
    want = det.score(x)
    with torch.no_grad():
        torch.testing.assert_close(det.score(x), want)
    with torch.inference_mode():
        x_inf = torch.randn(4, 6).copy_(x)
        torch.testing.assert_close(det.score(x_inf), want)


# ---------------------------------------------------------------------------- Mahalanobis
def _numpy_gaussians(feats, y, num_classes):
    means = np.stack([feats[y == c].mean(0) for c in range(num_classes)])
    centered = feats - means[y]
    return means, np.linalg.pinv(centered.T @ centered / len(feats), hermitian=True)


def _numpy_min_distance(f, means, prec):
    return np.min([[(fi - m) @ prec @ (fi - m) for m in means] for fi in f], axis=1)


@pytest.mark.parametrize("batch_size", [16, 7])
def test_mahalanobis_streaming_fit_equals_direct_computation(batch_size):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()  # float64: batching is exact
    x = torch.randn(90, 5, dtype=torch.float64)
    y = torch.arange(90) % 3
    det = Mahalanobis(net).fit(DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True))
    with torch.no_grad():
        feats = net[1](net[0](x)).double().numpy()
    means, prec = _numpy_gaussians(feats, y.numpy(), 3)
    np.testing.assert_allclose(det.means[0].numpy(), means, atol=1e-10)
    np.testing.assert_allclose(det.precisions[0].numpy(), prec, rtol=1e-7, atol=1e-8)
    q = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        fq = net[1](net[0](q)).numpy()
    np.testing.assert_allclose(det.score(q).numpy(), _numpy_min_distance(fq, means, prec), rtol=1e-6)
    assert torch.equal(det.predict_class(q), net(q).argmax(1))


def test_mahalanobis_fit_is_accurate_for_features_far_from_zero():
    # A constant offset of 1e4 in every feature would wipe out a naive E[zz^T] - mu mu^T in float32 and
    # cost digits in float64; the streamed moments are taken around a shift.
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[0].bias.fill_(1e4)
    x = torch.randn(64, 4, dtype=torch.float64)
    net = net.double()
    y = torch.arange(64) % 2
    det = Mahalanobis(net).fit(DataLoader(TensorDataset(x, y), batch_size=10))
    means, prec = _numpy_gaussians(x.numpy() + 1e4, y.numpy(), 2)
    np.testing.assert_allclose(det.precisions[0].numpy(), prec, rtol=1e-9)


def test_mahalanobis_named_conv_layers_use_pooled_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(40, 1, 6, 6)
    y = torch.arange(40) % 2
    det = Mahalanobis(net, layers=["0", "4"]).fit(DataLoader(TensorDataset(x, y), batch_size=8))
    with torch.no_grad():
        conv = net[0](x).mean(dim=(2, 3)).double().numpy()
        logits = net(x).double().numpy()
    q = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        conv_q, logits_q = net[0](q).mean(dim=(2, 3)).double().numpy(), net(q).double().numpy()
    want = 0
    for i, (train, test) in enumerate([(conv, conv_q), (logits, logits_q)]):
        means, prec = _numpy_gaussians(train, y.numpy(), 2)
        np.testing.assert_allclose(det.means[i].numpy(), means, atol=1e-9)
        want = want + _numpy_min_distance(test, means, prec)
    np.testing.assert_allclose(det.score(q).numpy(), want, rtol=1e-4)  # layer scores summed


def test_mahalanobis_perturbation_matches_manual_autograd_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(60, 5)
    y = torch.arange(60) % 3
    eps = 0.05
    det = Mahalanobis(net, layers=["1", "3"], epsilon=eps).fit(DataLoader(TensorDataset(x, y), batch_size=32))
    plain = det.replace(epsilon=0.0)
    q = torch.randn(4, 5)

    def layer_distance(inp, layer):
        h = net[1](net[0](inp))
        f = h if layer == 0 else net[3](net[2](h))
        means, prec = det.means[layer].float(), det.precisions[layer].float()
        diff = f[:, None, :] - means[None]
        return torch.einsum("bcf,fg,bcg->bc", diff, prec, diff).min(1).values

    want = 0
    for layer in range(2):
        qr = q.clone().requires_grad_()
        (grad,) = torch.autograd.grad(layer_distance(qr, layer).sum(), qr)
        with torch.no_grad():
            want = want + layer_distance(q - eps * grad.sign(), layer)  # paper Eq. 4 for this layer
    torch.testing.assert_close(det.score(q), want, rtol=1e-4, atol=1e-4)
    assert (det.score(q) < plain.score(q)).all()  # the step moves towards the closest class
    assert all(p.grad is None for p in net.parameters())


def test_mahalanobis_skips_classes_without_samples_and_checks_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 4))  # e.g. an n+1 classifier: class 3 never labeled
    x = torch.randn(30, 3)
    y = torch.arange(30) % 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: classes 0..2 are all there
        det = Mahalanobis(net).fit([(x, y)])
    assert det.classes.tolist() == [0, 1, 2] and det.means[0].shape == (3, 5)
    with pytest.warns(UserWarning, match=r"classes \[1\] have no training samples"):
        Mahalanobis(net).fit([(x, torch.where(y == 1, 2, y))])  # labels {0, 2}
    with pytest.raises(ValueError, match=r"without labels.*expected \(images, labels\)"):
        Mahalanobis(net).fit([x])
    with pytest.raises(ValueError, match="no samples"):
        Mahalanobis(net).fit([])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        Mahalanobis(net).fit([(x, -torch.ones(30, dtype=torch.long))])
    with pytest.raises(ValueError, match=r"30 images but labels of shape \(29,\)"):
        Mahalanobis(net).fit([(x, y[:29])])
    with pytest.raises(ValueError, match="layers"):
        Mahalanobis(net, layers=["nope"])
    with pytest.raises(RuntimeError, match="not fitted"):
        Mahalanobis(net).score(x)
    with pytest.raises(TypeError, match="split_head"):
        Mahalanobis(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_mahalanobis_on_a_two_head_model_has_no_predictions():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            z = self.body(x)
            return z[:, :2], z[:, 2:]

    torch.manual_seed(0)
    net = Two()
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    det = Mahalanobis(net, layers=["body"]).fit([(x, y)])
    assert det.predict_class(x) is None and det.score(x).shape == (20,)


# ---------------------------------------------------------------------------- two-head, n+1, ICE
def test_discrepancy_score_and_prediction():
    class Two(nn.Module):
        def forward(self, x):
            return x[:, :3], x[:, 3:]

    x = torch.randn(6, 6)
    p1, p2 = x[:, :3].softmax(1), x[:, 3:].softmax(1)
    det = Discrepancy(Two())
    torch.testing.assert_close(det.score(x), (p1 - p2).abs().sum(1))
    assert torch.equal(det.predict_class(x), (p1 + p2).argmax(1))
    same = torch.cat([x[:, :3], x[:, :3]], 1)
    torch.testing.assert_close(det.score(same), torch.zeros(6))  # heads agree: most ID
    with pytest.raises(TypeError, match="logits1, logits2"):
        Discrepancy(nn.Identity()).score(x)


def test_extra_class_needs_two_outputs():
    with pytest.raises(ValueError, match="at least 2 outputs"):
        ExtraClass(nn.Linear(3, 1)).score(torch.randn(2, 3))


def test_ice_likelihood_on_a_gaussian_head():
    torch.manual_seed(0)
    head = GaussianHead(4, 3)
    with torch.no_grad():
        head.lower.copy_(torch.randn(4, 4) * 0.3)
        head.log_diag.copy_(torch.randn(4) * 0.2)
        head.means.copy_(torch.randn(3, 4))
    det = ICELikelihood(GaussianClassifier(nn.Identity(), head))
    z = torch.randn(8, 4)
    L_inv = torch.linalg.inv(head.scale_tril.detach().double())  # explicit inverse: fine for a reference
    diff = z.double()[:, None, :] - head.means.detach().double()[None]
    h = -((diff @ L_inv.T) ** 2).sum(-1)  # [8, 3]
    torch.testing.assert_close(det.score(z).double(), -h.max(1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(det.in_distribution_probability(z).double(), h.max(1).values.exp(), rtol=1e-5, atol=1e-6)
    assert torch.equal(det.predict_class(z), h.argmax(1))
    assert (det.score(z) >= 0).all()


# ---------------------------------------------------------------------------- tuning
def test_tune_detector_picks_best_on_validation(model):
    torch.manual_seed(1)
    id_val = [torch.randn(30, 6) * 3]
    ood_val = [torch.randn(30, 6) * 0.1]
    grid = {"T": [1.0, 100.0], "epsilon": [0.0, 0.01]}
    best, params, results = tune_detector(lambda **p: ODIN(model, **p), grid, id_val, ood_val)
    assert [r[0] for r in results] == [{"T": 1.0, "epsilon": 0.0}, {"T": 1.0, "epsilon": 0.01},
                                       {"T": 100.0, "epsilon": 0.0}, {"T": 100.0, "epsilon": 0.01}]
    for p, m in results:  # the table holds each grid point's real validation metrics
        det = ODIN(model, **p)
        assert m == ood_metrics(det.score_loader(id_val), det.score_loader(ood_val))
    top = max(results, key=lambda r: r[1]["auroc"])
    assert params == top[0] and (best.T, best.epsilon) == (params["T"], params["epsilon"])
    _, params_fpr, _ = tune_detector(lambda **p: ODIN(model, **p), grid, id_val, ood_val, metric="fpr95")
    assert params_fpr == min(results, key=lambda r: r[1]["fpr95"])[0]
    text = tuning_table(results)
    assert "epsilon" in text and "auroc" in text and len(text.splitlines()) == 6
    from_generators, params_gen, _ = tune_detector(lambda **p: ODIN(model, **p),
                                                   {k: (v for v in values) for k, values in grid.items()},
                                                   id_val, ood_val)
    assert params_gen == params  # grid values given as generators are read once, not used up by the checks


def test_detectors_restore_the_modes_a_head_view_keeps_outside_its_children():
    from fastood.models import SmallCNN

    net = SmallCNN(in_channels=1, num_classes=3, image_size=28, width=4)
    classifier = GaussianClassifier.from_model(net)
    classifier.train()
    net.body[1].eval()  # a BatchNorm the user froze on purpose
    modes = {name: m.training for name, m in net.named_modules()}
    ICELikelihood(classifier).score(torch.rand(2, 1, 28, 28) * 2 - 1)
    assert {name: m.training for name, m in net.named_modules()} == modes
    classifier.init_from_loader([(torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8) % 3)], ridge=0.1)
    assert {name: m.training for name, m in net.named_modules()} == modes


def test_tune_mahalanobis_with_fit_loader_or_replace():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(40, 4), torch.arange(40) % 2
    train = [(x, y)]
    id_val, ood_val = [torch.randn(20, 4)], [torch.randn(20, 4) * 1.5]
    grid = {"epsilon": [0.0, 0.05, 0.2]}
    a, pa, ra = tune_detector(lambda **p: Mahalanobis(net, **p), grid, id_val, ood_val, fit_loader=train)
    fitted = Mahalanobis(net).fit(train)
    b, pb, rb = tune_detector(lambda **p: fitted.replace(**p), grid, id_val, ood_val)
    assert 0.5 < ra[0][1]["auroc"] < 1.0  # a real choice to make
    assert pa == pb and ra == rb  # refitting per grid point and replace() on one fit give the same table
    assert b.means is fitted.means and a.means is not fitted.means


def test_tune_detector_rejects_bad_arguments(model):
    calls = []

    def make(**p):
        calls.append(p)
        return MSP(model)

    with pytest.raises(ValueError, match="metric must be one of"):
        tune_detector(make, {"T": [1.0]}, [torch.randn(2, 6)], [torch.randn(2, 6)], metric="accuracy")
    with pytest.raises(ValueError, match="non-empty dict"):
        tune_detector(make, {}, [torch.randn(2, 6)], [torch.randn(2, 6)])
    with pytest.raises(ValueError, match=r"grid\['T'\] must be a non-empty list"):
        tune_detector(make, {"T": []}, [torch.randn(2, 6)], [torch.randn(2, 6)])
    assert calls == []  # rejected before any detector was built
