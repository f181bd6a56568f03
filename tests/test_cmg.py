"""ClassMixSampler (i != j, elementwise mixes, sigma) and CMGTrainer (stage 2 of CMG)."""
import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import Energy, ExtraClass
from fastood.models import SmallCNN
from fastood.models.cvae import ConditionalVAE
from fastood.samplers.class_mix import ClassMixSampler
from fastood.trainers import StandardTrainer
from fastood.trainers.cmg import CMGTrainer, cmg_energy_loss, energy_score, mlp_head_split
from fastood.trainers.resume import ResumeMismatch
from toy_images import stripes


def tiny_cvae(num_classes=3, conditioning="embedding"):
    torch.manual_seed(0)
    return ConditionalVAE(1, 28, num_classes, 4, width=4, hidden=16, conditioning=conditioning)


@functools.lru_cache(maxsize=None)
def _pretrained_state():
    torch.manual_seed(1)
    model = SmallCNN(1, 3, 28, width=4, feat_dim=8)
    StandardTrainer(model, progress=False, lr=0.05).fit(loader(n=60), epochs=4)
    return model.state_dict()


def tiny_classifier():
    """A tiny SmallCNN pretrained on the stripes (stage 1 of CMG's setting: a trained classifier)."""
    model = SmallCNN(1, 3, 28, width=4, feat_dim=8)
    model.load_state_dict(_pretrained_state())
    return model.eval()


def loader(n=40, batch_size=10):
    return DataLoader(TensorDataset(*stripes(n)), batch_size=batch_size, shuffle=True)


class FixedImages:
    """A deterministic pseudo-OOD source: always the same images (so their energies can be checked by hand)."""

    def __init__(self, n=64):
        self.images = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1
        self.calls = 0

    def sample(self, model, n, shape=None, context=None):
        self.calls += 1
        return self.images[torch.arange(n) % len(self.images)]


# ---------------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("conditioning", ["embedding", "onehot"])
def test_class_mix_never_pairs_a_class_with_itself(conditioning):
    sampler = ClassMixSampler(tiny_cvae(3, conditioning))
    out = sampler.sample(None, 3000, (1, 28, 28))
    assert out.shape == (3000, 1, 28, 28) and not out.requires_grad
    i, j = sampler.stats["pairs"].unbind(1)
    assert (i != j).all()
    counts = torch.bincount(i * 3 + j, minlength=9).view(3, 3)
    assert (counts.diagonal() == 0).all()
    off = counts[~torch.eye(3, dtype=torch.bool)].double()
    assert (off / off.sum() - 1 / 6).abs().max() < 0.03  # the six ordered pairs equally often
    assert abs(sampler.stats["mask_fraction"] - 0.5) < 0.02
    # latents ~ N(0, 25 I) in d = 4: E|z|^2 = 100
    assert abs(sampler.stats["latent_norm"].square().mean() - 100) < 8


def test_mixed_conditions_take_each_element_from_one_of_the_two_classes():
    cvae = tiny_cvae()
    sampler = ClassMixSampler(cvae)
    pairs = torch.tensor([[0, 1], [2, 0], [1, 2]] * 50)
    cond, k = sampler.mixed_conditions(pairs)
    e_i, e_j = cvae.class_vectors(pairs[:, 0]), cvae.class_vectors(pairs[:, 1])
    torch.testing.assert_close(cond, k * e_i + (1 - k) * e_j)
    assert set(k.unique().tolist()) == {0.0, 1.0}
    assert 0 < k.mean() < 1 and (k.std(1) > 0).any()  # elementwise, not one k per sample


def test_class_mix_decodes_the_mixed_condition():
    cvae = tiny_cvae()
    sampler = ClassMixSampler(cvae, sigma=5.0)
    torch.manual_seed(3)
    out = sampler.sample(None, 6)
    torch.manual_seed(3)
    pairs = sampler.pairs(6)
    z = 5.0 * torch.randn(6, 4)
    cond, _ = sampler.mixed_conditions(pairs)
    with torch.no_grad():
        torch.testing.assert_close(out, cvae.decode(z, cond))


def test_class_mix_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        ClassMixSampler(tiny_cvae(1))
    with pytest.raises(ValueError, match="sigma"):
        ClassMixSampler(tiny_cvae(), sigma=0)
    with pytest.raises(ValueError, match="does not match the CVAE's image shape"):
        ClassMixSampler(tiny_cvae()).sample(None, 2, (3, 32, 32))
    with pytest.raises(TypeError, match="must provide 'class_vectors'"):
        ClassMixSampler(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------- losses
def test_energy_loss_matches_hand_computation():
    torch.manual_seed(0)
    f_in, f_out, y = torch.randn(5, 3) * 3, torch.randn(4, 3) * 3, torch.tensor([0, 1, 2, 0, 1])
    m_in, m_out = -2.0, -1.0
    loss, ce, reg = cmg_energy_loss(f_in, y, f_out, m_in, m_out, lam=0.1, T=2.0)
    e_in = torch.stack([-2.0 * torch.log(torch.exp(row / 2.0).sum()) for row in f_in])
    e_out = torch.stack([-2.0 * torch.log(torch.exp(row / 2.0).sum()) for row in f_out])
    hand_ce = -torch.stack([torch.log_softmax(f_in[i], 0)[y[i]] for i in range(5)]).mean()
    hand_reg = (torch.clamp(e_in - m_in, min=0) ** 2).mean() + (torch.clamp(m_out - e_out, min=0) ** 2).mean()
    torch.testing.assert_close(ce, hand_ce)
    torch.testing.assert_close(reg, hand_reg)
    torch.testing.assert_close(loss, hand_ce + 0.1 * hand_reg)
    torch.testing.assert_close(energy_score(f_in, 2.0), e_in)


# ---------------------------------------------------------------------------------------------------- trainer
def test_margins_equal_the_quantiles_of_the_pretrained_energies():
    model = tiny_classifier()
    pretrained = copy.deepcopy(model)
    data, fixed = loader(), FixedImages()
    trainer = CMGTrainer(model, fixed, mode="energy", progress=False).fit(data, epochs=1)
    x = data.dataset.tensors[0]
    with torch.no_grad():
        e_id = -torch.logsumexp(pretrained(x), 1)
        e_ood = -torch.logsumexp(pretrained(fixed.images[torch.arange(40) % 64]), 1)
    assert trainer.m_in == pytest.approx(float(torch.quantile(e_id.double(), 0.2)), rel=1e-5, abs=1e-5)
    assert trainer.m_out == pytest.approx(float(torch.quantile(e_ood.double(), 0.8)), rel=1e-5, abs=1e-5)
    # measured once, before training: later epochs' pools and the fine-tuned head do not move them
    m = (trainer.m_in, trainer.m_out)
    trainer.on_fit_start(data)
    assert (trainer.m_in, trainer.m_out) == m


@pytest.mark.parametrize("mode", ["energy", "softmax"])
def test_frozen_backbone_is_unchanged_and_features_are_cached(mode):
    model = tiny_classifier()
    model.train()  # stage 2 must still leave BatchNorm statistics alone
    before = copy.deepcopy(model.state_dict())
    data, fixed = loader(), FixedImages()
    calls = {"n": 0}
    model.body.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    trainer = CMGTrainer(model, fixed, mode=mode, progress=False, lr=0.1).fit(data, epochs=3)
    after = model.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # (softmax mode: the grown fc, [4, 8] instead of [3, 8])
    assert all(not p.requires_grad for name, p in model.named_parameters() if not name.startswith("fc."))
    assert not model.body.training
    # backbone passes: the 4 ID batches once, then one pseudo-OOD pool (40 images, 1 chunk) per epoch
    assert calls["n"] == 4 + 3 and fixed.calls == 3
    assert len(trainer.history) == 12


def test_softmax_mode_adds_an_ood_class_and_rejects_pseudo_ood():
    model = tiny_classifier()
    old_fc = copy.deepcopy(model.fc)
    data, fixed = loader(), FixedImages()
    trainer = CMGTrainer(model, fixed, mode="softmax", progress=False, lr=0.1)
    assert model.fc.out_features == 4
    torch.testing.assert_close(model.fc.weight[:3], old_fc.weight)
    trainer.fit(data, epochs=5)
    det = trainer.detector()
    assert isinstance(det, ExtraClass)
    id_scores, ood_scores = det.score(data.dataset.tensors[0]), det.score(fixed.images)
    assert ood_scores.mean() > id_scores.mean() + 0.3
    assert trainer.history[-1]["ood_rejected"] >= 0.8


def test_energy_mode_raises_pseudo_ood_energy_and_detector_works_on_images():
    model = tiny_classifier()
    pretrained = copy.deepcopy(model)
    data, fixed = loader(), FixedImages()
    trainer = CMGTrainer(model, fixed, mode="energy", progress=False, lr=0.1, lam=1.0).fit(data, epochs=8)
    det = trainer.detector()
    assert isinstance(det, Energy)
    x = data.dataset.tensors[0]
    gap_before = Energy(pretrained).score(fixed.images).mean() - Energy(pretrained).score(x).mean()
    gap_after = det.score(fixed.images).mean() - det.score(x).mean()
    assert gap_after > gap_before + 0.5
    torch.testing.assert_close(det.score(x), Energy(model).score(x))  # the model itself was fine-tuned


def test_whole_head_option_trains_the_fully_connected_tail():
    model = tiny_classifier()
    before = copy.deepcopy(model.state_dict())
    backbone, head = mlp_head_split(model)
    assert isinstance(head[-1], nn.Linear) and head[-1] is model.fc
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(head(backbone(x)), model.eval()(x))
    trainer = CMGTrainer(model, FixedImages(), mode="energy", train="head", progress=False, lr=0.1)
    trainer.fit(loader(), epochs=2)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"body.13.weight", "body.13.bias", "fc.weight", "fc.bias"}  # Linear(4w, feat) + fc


def test_resume_keeps_the_margins(tmp_path):
    data = loader()
    first = CMGTrainer(tiny_classifier(), FixedImages(), progress=False, checkpoint_dir=str(tmp_path))
    first.fit(data, steps=3)
    other = CMGTrainer(tiny_classifier(), FixedImages(), progress=False, checkpoint_dir=str(tmp_path),
                       margins=(100.0, 200.0))
    with pytest.raises(ResumeMismatch, match="margins"):  # other hyperparameters: refused, never silently mixed
        other.fit(data, steps=5)
    same = CMGTrainer(tiny_classifier(), FixedImages(), progress=False, checkpoint_dir=str(tmp_path))
    same.fit(data, steps=5)  # the measured margins come from the checkpoint, not a new measurement
    assert (same.m_in, same.m_out) == (first.m_in, first.m_out) and same.step == 5


def test_resume_continues_on_the_same_cached_order_whatever_the_global_rng(tmp_path):
    data = loader()  # shuffles: its order comes from torch's global RNG
    torch.manual_seed(1)
    straight = CMGTrainer(tiny_classifier(), FixedImages(), progress=False).fit(data, steps=6)
    torch.manual_seed(1)
    CMGTrainer(tiny_classifier(), FixedImages(), progress=False, checkpoint_dir=str(tmp_path)).fit(data, steps=3)
    torch.manual_seed(2)  # a new process: another global RNG state when the features are cached again
    resumed = CMGTrainer(tiny_classifier(), FixedImages(), progress=False, checkpoint_dir=str(tmp_path))
    resumed.fit(data, steps=6)
    assert torch.equal(resumed.id_labels, straight.id_labels)
    for a, b in zip(straight.head.parameters(), resumed.head.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_explicit_split_and_default_class_mix_sampler():
    model = tiny_classifier()
    backbone = nn.Sequential(*list(model.body))
    head = nn.Linear(8, 3)
    trainer = CMGTrainer(model, tiny_cvae(), mode="softmax", split=(backbone, head), progress=False)
    assert isinstance(trainer.sampler, ClassMixSampler)
    assert trainer.head.out_features == 4
    trainer.fit(loader(), epochs=1)
    assert trainer.detector().score(torch.rand(2, 1, 28, 28)).shape == (2,)


def test_cmg_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        CMGTrainer(tiny_classifier(), FixedImages(), mode="entropy")
    with pytest.raises(ValueError, match="train must be one of"):
        CMGTrainer(tiny_classifier(), FixedImages(), train="all")
    with pytest.raises(TypeError, match="split=\\(backbone, head\\)"):
        CMGTrainer(nn.Sequential(nn.Flatten(), nn.Linear(784, 3)), FixedImages(), train="head")
    with pytest.raises(TypeError, match="ConditionalVAE or a sampler"):
        CMGTrainer(tiny_classifier(), object())
    with pytest.raises(ValueError, match="labeled ID batches"):
        CMGTrainer(tiny_classifier(), FixedImages(), progress=False).fit([torch.zeros(2, 1, 28, 28)])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        bad = DataLoader(TensorDataset(torch.zeros(4, 1, 28, 28), torch.full((4,), 3)))
        CMGTrainer(tiny_classifier(), FixedImages(), progress=False).fit(bad)
    with pytest.raises(ValueError, match="NaN/Inf"):
        bad = DataLoader(TensorDataset(torch.full((4, 1, 28, 28), float("nan")), torch.zeros(4, dtype=torch.long)))
        CMGTrainer(tiny_classifier(), FixedImages(), progress=False).fit(bad)


# ---------------------------------------------------------------------------------------------------- issue 12
def test_stage2_defaults_follow_the_paper_and_the_authors():
    trainer = CMGTrainer(tiny_classifier(), FixedImages(), progress=False)
    opt = trainer.optimizer
    # Wang et al. 2022 / shaoyijia/CMG training/fine_tune.py: torch.optim.Adam(..., lr=0.0001), no weight decay
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 1e-4 and opt.param_groups[0]["weight_decay"] == 0
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in trainer.head.parameters()}
    assert (trainer.lam, trainer.T, trainer.quantiles) == (0.1, 1.0, (0.2, 0.8))
    # shaoyijia/CMG models/vae.py: class_embed = nn.Linear(class_num, z_dim), z_dim = 32
    assert ConditionalVAE(1, 28, 5, conditioning="embedding").cond_dim == 32


def test_each_ddp_rank_draws_its_own_pseudo_ood_pool(monkeypatch):
    import fastood.trainers.cmg as cmg

    data = loader()
    pools = {}
    for r in (0, 1):
        monkeypatch.setattr(cmg, "rank", lambda r=r: r)
        trainer = CMGTrainer(tiny_classifier(), tiny_cvae(), progress=False)
        trainer.cache_id_features(data)
        pools[r] = trainer.ood_features(0)
    monkeypatch.undo()
    single = CMGTrainer(tiny_classifier(), tiny_cvae(), progress=False)
    single.cache_id_features(data)
    assert torch.equal(single.ood_features(0), pools[0])      # rank 0 keeps the single-process pool
    assert not torch.allclose(pools[0], pools[1])            # rank 1 sees other pseudo-OOD images


class _Augmenting(torch.utils.data.Dataset):
    """Stripes with random noise added on every load (a random augmentation)."""

    def __init__(self):
        self.x, self.y = stripes(20)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


def test_warns_when_an_augmenting_loader_is_frozen_into_the_feature_cache():
    trainer = CMGTrainer(tiny_classifier(), FixedImages(), progress=False)
    with pytest.warns(UserWarning, match="random augmentation"):
        trainer.cache_id_features(DataLoader(_Augmenting(), batch_size=10))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        CMGTrainer(tiny_classifier(), FixedImages(), progress=False).cache_id_features(loader())


def test_margin_fractions_are_logged_and_idle_margins_warn():
    from fastood.trainers import MechanismIdleWarning

    trainer = CMGTrainer(tiny_classifier(), FixedImages(), progress=False)
    trainer.fit(loader(), steps=1)
    logs = trainer.history[0]
    # at the start the margins are the 20th / 80th percentiles: about a fifth of each side is inside
    assert 0.0 <= logs["id_inside"] <= 0.5 and 0.0 <= logs["ood_inside"] <= 0.5
    loose = CMGTrainer(tiny_classifier(), FixedImages(), progress=False, margins=(1e6, -1e6))
    with pytest.warns(MechanismIdleWarning, match="energy regularizer was 0"):
        loose.fit(loader(), epochs=1)
    assert all(h["id_inside"] == 1.0 and h["ood_inside"] == 1.0 for h in loose.history)
    with pytest.warns(MechanismIdleWarning, match="lam = 0"):
        CMGTrainer(tiny_classifier(), FixedImages(), progress=False, lam=0).fit(loader(), epochs=1)
