import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import ICELikelihood, MSP, Discrepancy, Energy
from fastood.models import GaussianClassifier, GaussianHead, TwoHead
from fastood.trainers import MechanismIdleWarning, StandardTrainer
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


@pytest.mark.parametrize("quantiles, q_in", [(None, 0.8), ((0.2, 0.8), 0.2)])  # the default; the old (CMG's) rule
def test_energy_oe_auto_margins_are_quantiles_measured_once(quantiles, q_in):
    model = _pretrained()
    loader = DataLoader(TensorDataset(*_id_data()), batch_size=32)  # unshuffled: the measured batches are known
    outliers = _outlier_loader(batch=32)
    kw = {} if quantiles is None else {"auto_quantiles": quantiles}
    trainer = EnergyOETrainer(copy.deepcopy(model), outliers=outliers, margins="auto", auto_batches=2,
                              progress=False, seed=0, **kw)
    # expected: the q_in / 80th percentiles over the first 2 ID batches and the first 2 outlier batches (eval mode)
    same_order = as_outlier_source(outliers, seed=0)  # the trainer's source uses the trainer's seed
    x_out = torch.cat([same_order.draw(None, None, None) for _ in range(2)])
    x_in = _id_data()[0][:64]
    with torch.no_grad():
        e_in, e_out = -torch.logsumexp(model(x_in), 1), -torch.logsumexp(model(x_out), 1)
    trainer.fit(loader, steps=3)
    assert trainer.m_in == pytest.approx(float(torch.quantile(e_in.double(), q_in)), rel=1e-5)
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


def _near_outlier_loader(spread=0.6, batch=32):
    """ID images plus N(0, spread^2) noise: about 4x the clusters' spread away from them."""
    x, _ = _id_data(128, seed=7)
    x = x + spread * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    return DataLoader(TensorDataset(x), batch_size=batch, shuffle=True)


def test_ice_outlier_term_is_active_from_step_0_with_the_default_head_scale():
    # Issue 12: with the head at the plain class covariance, -h_y of ID features is about the feature dimension,
    # so outliers a few cluster widths away have max h ~ -130 and -log(1 - exp(max h)) is ~0 (1e-6 here).
    # head_scale="median" puts the median ID feature at h_y = -1: the same outliers give the term weight at step 0.
    active = ICETrainer(_pretrained(), outliers=_near_outlier_loader(), progress=False)
    active.fit(_id_loader(), steps=1)
    first = active.history[0]
    assert first["outlier_nll"] > 1e-3 and first["outlier_grad_vs_ce"] > 1e-3
    assert 0 < first["outlier_grad_share"] < 1
    plain = ICETrainer(_pretrained(), outliers=_near_outlier_loader(), head_scale=1.0, progress=False)
    plain.fit(_id_loader(), steps=1)
    assert plain.history[0]["outlier_nll"] < 1e-2 * first["outlier_nll"]


def test_ice_warns_when_the_outlier_term_carries_no_gradient():
    # Outliers far beyond every class (max h ~ -1e4 even at the median scale): exp(max h) underflows to 0.
    far = DataLoader(TensorDataset(10 * _outliers()), batch_size=16, shuffle=True)
    trainer = ICETrainer(_pretrained(), outliers=far, progress=False)
    with pytest.warns(MechanismIdleWarning, match="outlier term"):
        trainer.fit(_id_loader(), steps=1)
    assert trainer.history[0]["outlier_grad_share"] < 1e-8
    busy = ICETrainer(_pretrained(), outliers=_near_outlier_loader(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechanismIdleWarning)
        busy.fit(_id_loader(), steps=1)


def test_ice_grad_share_is_measured_every_n_steps():
    trainer = ICETrainer(_pretrained(), outliers=_outlier_loader(), grad_share_every=3, progress=False)
    trainer.fit(_id_loader(), steps=7)
    measured = [h["step"] for h in trainer.history if "outlier_grad_share" in h]
    assert measured == [1, 4, 7]  # before optimizer steps 0, 3, 6


def test_ice_defaults_follow_the_paper_recipe():
    # Wu et al. (AAAI 2023), fine-tuning: lr 0.01 with cosine decay, 128 ID + 256 outliers per batch, lam = 1.
    trainer = ICETrainer(_pretrained(), outliers=_outlier_loader(), progress=False)
    assert trainer.lr == 0.01 and trainer.outlier_ratio == 2.0 and trainer.lam == 1.0
    assert trainer.head_scale == "median" and trainer.grad_clip == 10.0
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    trainer.fit(_id_loader(), steps=4)
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert ICETrainer.progress_keys == ("loss", "ce", "outlier_nll", "outlier_grad_share")


def _bn_backbone(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU())


def test_ice_freezes_batchnorm_only_for_a_head_fitted_on_trained_features():
    # From scratch (a fresh GaussianHead): BatchNorm must learn its statistics.
    scratch = GaussianClassifier(_bn_backbone(), GaussianHead(16, 2))
    running = scratch.backbone[1].running_mean.clone()
    trainer = ICETrainer(scratch, outliers=_outlier_loader(), progress=False)
    assert trainer.freeze_bn is False
    trainer.fit(_id_loader(), steps=2)
    assert not torch.equal(scratch.backbone[1].running_mean, running)
    # Fine-tuning a trained classifier: the head is fitted on its features, BatchNorm keeps those statistics.
    classifier = nn.Sequential(_bn_backbone(), nn.Linear(16, 2))
    StandardTrainer(classifier, lr=0.05, progress=False).fit(_id_loader(), steps=5)
    lazy = ICETrainer(copy.deepcopy(classifier), outliers=_outlier_loader(), progress=False)
    assert lazy.freeze_bn is False           # head not fitted yet
    lazy.fit(_id_loader(), steps=1)  # steps >= 1 (issue 14): the head is fitted before it
    assert lazy.freeze_bn is True            # fitted at the start of fit()
    eager = ICETrainer.from_classifier(copy.deepcopy(classifier), _id_loader(), outliers=_outlier_loader(),
                                       progress=False)
    assert eager.freeze_bn is True
    bn = next(m for m in eager.model.modules() if isinstance(m, nn.BatchNorm1d))
    running = bn.running_mean.clone()
    eager.fit(_id_loader(), steps=2)
    assert torch.equal(bn.running_mean, running)
    forced = ICETrainer(GaussianClassifier(_bn_backbone(), GaussianHead(16, 2)), outliers=_outlier_loader(),
                        freeze_bn=True, progress=False)
    assert forced.freeze_bn is True


def test_gaussian_head_median_scale_puts_the_median_training_feature_at_h_minus_1():
    torch.manual_seed(0)
    # an odd count: one median
    feats = torch.randn(301, 6) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    labels = torch.arange(301) % 3
    head = GaussianHead(6, 3).double().init_from_features(feats, labels, ridge=0.0, scale="median")
    with torch.no_grad():
        h_y = head(feats.double()).gather(1, labels[:, None]).squeeze(1)
    assert float(h_y.median()) == pytest.approx(-1.0, rel=1e-6)
    plain = GaussianHead(6, 3).double().init_from_features(feats, labels, ridge=0.0)
    assert float(plain(feats.double()).gather(1, labels[:, None]).median()) < -3  # about the dimension
    assert head.init_scale == pytest.approx(float(-plain(feats.double()).gather(1, labels[:, None]).median()),
                                            rel=1e-6)
    with pytest.raises(ValueError, match="scale"):
        GaussianHead(6, 3).init_from_features(feats, labels, scale=0)


def test_oe_warns_when_the_outlier_term_is_idle():
    # A model already uniform on everything (zero weights) with a negligible lr: the OE term has no gradient.
    model = nn.Sequential(nn.Linear(DIM, 2))
    nn.init.zeros_(model[0].weight), nn.init.zeros_(model[0].bias)
    trainer = OETrainer(model, outliers=_outlier_loader(), lr=1e-12, progress=False)
    with pytest.warns(MechanismIdleWarning, match="outlier_excess"):
        trainer.fit(_id_loader(), steps=2)
    assert trainer.history[0]["outlier_excess"] < 1e-6
    busy = OETrainer(_pretrained(), outliers=_outlier_loader(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechanismIdleWarning)
        busy.fit(_id_loader(), steps=2)
    assert busy.history[0]["outlier_excess"] > 1e-3


def test_energy_oe_warns_when_every_energy_is_inside_its_margin():
    idle = EnergyOETrainer(_pretrained(), outliers=_outlier_loader(), m_in=1e6, m_out=-1e6, progress=False)
    with pytest.warns(MechanismIdleWarning, match="margins='auto'"):
        idle.fit(_id_loader(), steps=2)
    busy = EnergyOETrainer(_pretrained(), outliers=_outlier_loader(), progress=False)  # -25 / -7: far off here
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechanismIdleWarning)
        busy.fit(_id_loader(), steps=2)
    assert busy.history[0]["margin"] > 0
    assert EnergyOETrainer.progress_keys == ("loss", "ce", "margin", "acc")


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
