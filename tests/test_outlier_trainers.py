import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import ICELikelihood, MSP, Discrepancy, Energy
from fastood.models import GaussianClassifier, GaussianHead, TwoHead
from fastood.trainers import StandardTrainer
from fastood.trainers.discrepancy import DiscrepancyTrainer
from fastood.trainers.ice import ICETrainer
from fastood.trainers.oe import EnergyOETrainer, OETrainer
from fastood.trainers.outliers import as_outlier_source

DIM = 4


def _id_data(n=128, seed=0):
    """Two classes: clusters at +-(0.6, 0.6, 0, 0)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centers = torch.tensor([[0.6, 0.6, 0.0, 0.0], [-0.6, -0.6, 0.0, 0.0]])
    x = centers[y] + 0.15 * torch.randn(n, DIM, generator=g)
    return x, y


def _outliers(n=128, seed=1):
    """Far from both clusters: uniform in [-2, 2]^4 with |x_2| + |x_3| >= 1."""
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(4 * n, DIM, generator=g) - 2
    x = x[x[:, 2:].abs().sum(1) >= 1.0][:n]
    return x


def _id_loader(batch=16):
    return DataLoader(TensorDataset(*_id_data()), batch_size=batch, shuffle=True)


def _outlier_loader(batch=16, with_labels=False):
    x = _outliers()
    ds = TensorDataset(x, torch.full((len(x),), -1)) if with_labels else TensorDataset(x)
    return DataLoader(ds, batch_size=batch, shuffle=True)


def _classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


_PRETRAINED = {}


def _pretrained():
    """A classifier trained with plain cross-entropy (cached for the module; copies are handed out)."""
    if "model" not in _PRETRAINED:
        model = _classifier()
        StandardTrainer(model, lr=0.05, progress=False).fit(_id_loader(), steps=60)
        _PRETRAINED["model"] = model.eval()
    return copy.deepcopy(_PRETRAINED["model"])


def _score_gap(detector):
    """mean score(outliers) - mean score(ID): larger = better separated (higher score = more OOD)."""
    x_in, _ = _id_data(256, seed=5)
    return float(detector.score(_outliers(256, seed=6)).mean() - detector.score(x_in).mean())


# ------------------------------------------------------------------------------------------------ OE
def test_oe_raises_msp_score_of_outliers_relative_to_id():
    model = _pretrained()
    before = _score_gap(MSP(model))
    trainer = OETrainer(model, outliers=_outlier_loader(with_labels=True), lr=0.05, progress=False, cosine=False)
    trainer.fit(_id_loader(), steps=40)
    det = trainer.detector()
    assert isinstance(det, MSP)
    after = _score_gap(det)
    assert after > before + 0.05
    outlier_terms = [h["outlier"] for h in trainer.history]
    assert sum(outlier_terms[-5:]) < sum(outlier_terms[:5])
    assert all(k in trainer.history[-1] for k in ("loss", "ce", "outlier", "acc"))


def test_joint_forward_is_one_pass_over_id_and_outliers():
    model = _pretrained()
    sizes = []
    model.register_forward_hook(lambda m, inputs, out: sizes.append(inputs[0].shape[0]))
    trainer = OETrainer(model, outliers=_outlier_loader(batch=24), progress=False)
    trainer.fit(_id_loader(batch=16), steps=2)
    assert sizes == [16 + 24, 16 + 24]
    sizes.clear()
    OETrainer(model, outliers=_outlier_loader(batch=24), joint_forward=False, progress=False).fit(
        _id_loader(batch=16), steps=1)
    assert sizes == [16, 24]


def test_cosine_schedule_reaches_zero():
    trainer = OETrainer(_pretrained(), outliers=_outlier_loader(), lr=0.01, progress=False)
    trainer.fit(_id_loader(), steps=5)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ Energy-OE
def test_energy_oe_raises_energy_of_outliers_relative_to_id():
    model = _pretrained()
    before = _score_gap(Energy(model))
    trainer = EnergyOETrainer(model, outliers=_outlier_loader(), m_in=-6.0, m_out=-1.0, lr=0.02, progress=False,
                              cosine=False)
    trainer.fit(_id_loader(), steps=40)
    det = trainer.detector()
    assert isinstance(det, Energy)
    assert _score_gap(det) > before + 0.5
    assert trainer.history[-1]["margin"] < trainer.history[0]["margin"]


def test_energy_oe_auto_margins_are_quantiles_measured_once():
    model = _pretrained()
    loader = DataLoader(TensorDataset(*_id_data()), batch_size=32)  # unshuffled: the measured batches are known
    outliers = _outlier_loader(batch=32)
    trainer = EnergyOETrainer(copy.deepcopy(model), outliers=outliers, margins="auto", auto_batches=2,
                              progress=False, seed=0)
    # expected: 20th / 80th percentiles over the first 2 ID batches and the first 2 outlier batches (eval mode)
    same_order = as_outlier_source(outliers, seed=0)  # the trainer's source uses the trainer's seed
    x_out = torch.cat([same_order.draw(None, None, None) for _ in range(2)])
    x_in = _id_data()[0][:64]
    with torch.no_grad():
        e_in, e_out = -torch.logsumexp(model(x_in), 1), -torch.logsumexp(model(x_out), 1)
    trainer.fit(loader, steps=3)
    assert trainer.m_in == pytest.approx(float(torch.quantile(e_in.double(), 0.2)), rel=1e-5)
    assert trainer.m_out == pytest.approx(float(torch.quantile(e_out.double(), 0.8)), rel=1e-5)
    assert trainer.m_in < trainer.m_out
    assert trainer.margins_measured and trainer.extra_state()["margins"]["measured"]
    measured = (trainer.m_in, trainer.m_out)
    trainer.fit(loader, steps=6)  # a second fit does not measure again
    assert (trainer.m_in, trainer.m_out) == measured


# ------------------------------------------------------------------------------------------------ ICE
def test_ice_from_classifier_initializes_the_gaussian_head_from_class_features():
    model = _pretrained()
    backbone_ref = copy.deepcopy(model)[:-1]
    trainer = ICETrainer.from_classifier(model, _id_loader(), outliers=_outlier_loader(), progress=False)
    assert isinstance(trainer.model, GaussianClassifier) and trainer.head_initialized
    x, y = _id_data()
    with torch.no_grad():
        feats = backbone_ref(x)
    means = torch.stack([feats[y == c].mean(0) for c in range(2)])
    torch.testing.assert_close(trainer.model.head.class_means.detach(), means, rtol=1e-4, atol=1e-5)
    assert isinstance(trainer.detector(), ICELikelihood)


def test_ice_fine_tuning_initializes_lazily_and_raises_id_likelihood():
    model = _pretrained()
    trainer = ICETrainer(model, outliers=_outlier_loader(), progress=False)
    assert not trainer.head_initialized  # a plain classifier: the Gaussian head is fitted at the start of fit()
    before_init = trainer.model.head.means.detach().clone()
    trainer.fit(_id_loader(), steps=1)  # steps must be >= 1: one step, the head fitted before it
    assert trainer.head_initialized and not torch.allclose(before_init, trainer.model.head.means.detach())
    det = trainer.detector()
    x_in, y = _id_data(256, seed=5)
    id_score = float(det.score(x_in).mean())
    trainer.fit(_id_loader(), steps=50)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.history)
    assert float(det.score(x_in).mean()) < 0.9 * id_score   # ID images look more in-distribution (-max h falls)
    assert (det.predict_class(x_in) == y).float().mean() > 0.95
    # These outliers are far (h ~ -40 and below), so the outlier term is ~0 here; see the next test for it.
    assert max(h["outlier_nll"] for h in trainer.history) < 1e-6


def test_ice_outlier_term_pushes_nearby_outliers_away():
    # Outliers placed right at the ID clusters: only the -log(1 - exp(max h)) term separates them.
    torch.manual_seed(0)
    head = GaussianHead(DIM, 2)
    with torch.no_grad():
        head.means.copy_(torch.tensor([[0.6, 0.6, 0.0, 0.0], [-0.6, -0.6, 0.0, 0.0]]))
        head.log_diag.fill_(-1.0)
    model = GaussianClassifier(nn.Linear(DIM, DIM), head)
    with torch.no_grad():
        model.backbone.weight.copy_(torch.eye(DIM))
        model.backbone.bias.zero_()
    near = _id_data(64, seed=3)[0] + torch.tensor([0.0, 0.0, 0.4, 0.0])
    det = ICELikelihood(model)
    before = float(det.score(near).mean() - det.score(_id_data(64, seed=4)[0]).mean())
    trainer = ICETrainer(model, outliers=DataLoader(TensorDataset(near), batch_size=16, shuffle=True), lr=0.02,
                         progress=False)
    trainer.fit(_id_loader(), steps=30)
    after = float(det.score(near).mean() - det.score(_id_data(64, seed=4)[0]).mean())
    assert trainer.history[0]["outlier_nll"] > 0.1
    assert after > before + 0.1


def test_ice_runs_on_a_sampler_and_freezes_batchnorm():
    from fastood.samplers.noise import GaussianNoiseSampler

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU())
    model = GaussianClassifier(backbone, GaussianHead(16, 2))
    running = backbone[1].running_mean.clone()
    trainer = ICETrainer(model, outliers=GaussianNoiseSampler(std=1.0), outlier_ratio=0.5, lr=0.01, progress=False,
                         freeze_bn=True)
    trainer.fit(_id_loader(batch=16), steps=4)
    assert trainer.outliers.batches_drawn == 4 and trainer.outliers.sampler.stats == {"n": 8}
    assert torch.equal(backbone[1].running_mean, running)  # freeze_bn: running stats untouched
    assert backbone[1].weight.grad is not None               # ... but its affine weights are trained


# ------------------------------------------------------------------------------------------------ discrepancy
def _two_head(seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
    return TwoHead(backbone, 32, 2)


def _unlabeled_loader():
    x = torch.cat([_id_data(64, seed=8)[0], _outliers(64, seed=9)])
    return DataLoader(TensorDataset(x, torch.full((len(x),), -1)), batch_size=32, shuffle=True)


def test_discrepancy_trainer_makes_heads_disagree_on_ood():
    model = _two_head()
    trainer = DiscrepancyTrainer(model, unlabeled=_unlabeled_loader(), pretrain_steps=36, lr=0.05, progress=False)
    trainer.fit(_id_loader(), steps=36)
    assert trainer.unlabeled.batches_drawn == 0           # step A: supervised only, nothing drawn
    assert "unlabeled" not in trainer.history[-1]
    det = trainer.detector()
    assert isinstance(det, Discrepancy)
    before = _score_gap(det)
    trainer.fit(_id_loader(), steps=116)
    assert trainer.unlabeled.batches_drawn == 80
    assert _score_gap(det) > before + 0.1
    gaps = [h["entropy_gap"] for h in trainer.history[36:]]
    assert sum(gaps[-5:]) / 5 > sum(gaps[:5]) / 5
    x, y = _id_data(256, seed=5)
    assert (det.predict_class(x) == y).float().mean() > 0.95  # the heads still classify ID data


def test_discrepancy_needs_a_two_head_model():
    trainer = DiscrepancyTrainer(_classifier(), unlabeled=_unlabeled_loader(), progress=False)
    with pytest.raises(TypeError, match="TwoHead"):
        trainer.fit(_id_loader(), steps=1)


# ------------------------------------------------------------------------------------------------ resume
class _Interrupt(Exception):
    pass


def _crashing(cls):
    class Crashing(cls):
        def training_step(self, batch):
            if self.step == 7:
                raise _Interrupt
            return super().training_step(batch)
    return Crashing


@pytest.mark.parametrize("make", [
    lambda cls, **kw: cls(_pretrained(), outliers=_outlier_loader(batch=24), **kw),  # 5 batches/pass: wraps
    lambda cls, **kw: cls(_pretrained(), outliers=as_outlier_source(_outlier_loader(batch=24), exact=True),
                          outlier_ratio=1.5, **kw),
])
def test_resume_keeps_the_outlier_source_position(tmp_path, make):
    kw = dict(progress=False, checkpoint_every=1, lr=0.01)
    full = make(EnergyOETrainer, checkpoint_dir=tmp_path / "full", margins="auto", auto_batches=1, **kw)
    full.fit(_id_loader(), steps=12)

    crashed = make(_crashing(EnergyOETrainer), checkpoint_dir=tmp_path / "part", margins="auto", auto_batches=1, **kw)
    with pytest.raises(_Interrupt):
        crashed.fit(_id_loader(), steps=12)
    torch.manual_seed(321)
    resumed = make(EnergyOETrainer, checkpoint_dir=tmp_path / "part", margins="auto", auto_batches=1, **kw)
    resumed.fit(_id_loader(), steps=12)

    assert resumed.outliers.state_dict() == full.outliers.state_dict()
    assert resumed.outliers.batches_drawn > 8
    assert (resumed.m_in, resumed.m_out) == (full.m_in, full.m_out)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ice_resume_does_not_reinitialize_the_head(tmp_path):
    kw = dict(progress=False, checkpoint_every=1, lr=0.01, checkpoint_dir=tmp_path)
    first = ICETrainer(_pretrained(), outliers=_outlier_loader(), **kw)
    first.fit(_id_loader(), steps=3)
    second = ICETrainer(_pretrained(), outliers=_outlier_loader(), **kw)
    second.fit(_id_loader(), steps=3)  # resumed at its end: nothing to do, head from the checkpoint
    assert second.head_initialized and second.step == 3
    torch.testing.assert_close(second.model.head.means, first.model.head.means, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments():
    with pytest.raises(TypeError, match="outliers="):
        OETrainer(_classifier(), progress=False)
    with pytest.raises(TypeError, match="unlabeled="):
        DiscrepancyTrainer(_two_head(), progress=False)
    with pytest.raises(ValueError, match="lam"):
        OETrainer(_classifier(), outliers=_outlier_loader(), lam=-1)
    with pytest.raises(ValueError, match="margins"):
        EnergyOETrainer(_classifier(), outliers=_outlier_loader(), margins="sometimes")
    with pytest.raises(ValueError, match="outlier_ratio"):
        OETrainer(_classifier(), outliers=_outlier_loader(), outlier_ratio=0)
    with pytest.raises(ValueError, match="pretrain_steps"):
        DiscrepancyTrainer(_two_head(), unlabeled=_unlabeled_loader(), pretrain_steps=-1)
    with pytest.raises(TypeError, match="GaussianHead"):
        ICETrainer(nn.Sequential(nn.Linear(DIM, 2), nn.ReLU()), outliers=_outlier_loader())
    bad_shape = DataLoader(TensorDataset(torch.zeros(8, DIM + 1)), batch_size=4)
    with pytest.raises(ValueError, match="shape"):
        OETrainer(_classifier(), outliers=bad_shape, progress=False).fit(_id_loader(), steps=1)
