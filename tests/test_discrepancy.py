"""DiscrepancyTrainer (Yu & Aizawa, ICCV 2019): pre-training of head 2, the paper's step A / step B schedule, the
margin warning and the mechanism check. Tiny MLPs on 4-d points, 4 classes (log 4 = 1.39 > the paper's m = 1.2)."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.detectors import Discrepancy
from fastood.models import TwoHead
from fastood.trainers import MechanismIdleWarning, StandardTrainer
from fastood.trainers.discrepancy import DiscrepancyTrainer

DIM, CLASSES = 4, 4
CENTERS = torch.tensor([[0.8, 0, 0, 0], [-0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, -0.8, 0, 0]])


def id_data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    return CENTERS[y] + 0.12 * torch.randn(n, DIM, generator=g), y


def outliers(n=128, seed=1):
    """Far from every cluster: uniform in [-2, 2]^4 with |x_2| + |x_3| >= 1."""
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(6 * n, DIM, generator=g) - 2
    return x[x[:, 2:].abs().sum(1) >= 1.0][:n]


def id_loader(batch=16):
    return DataLoader(TensorDataset(*id_data()), batch_size=batch, shuffle=True)


def unlabeled_loader():
    x = torch.cat([id_data(64, seed=8)[0], outliers(64, seed=9)])
    return DataLoader(TensorDataset(x, torch.full((len(x),), -1)), batch_size=32, shuffle=True)


_PRETRAINED = {}


def pretrained_two_head():
    """``TwoHead.from_model`` of a classifier trained with cross-entropy: head 1 trained, head 2 fresh."""
    if "model" not in _PRETRAINED:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES))
        StandardTrainer(model, lr=0.05, progress=False).fit(id_loader(), steps=80)
        _PRETRAINED["model"] = model
    torch.manual_seed(1)
    return TwoHead.from_model(copy.deepcopy(_PRETRAINED["model"]))


def score_gap(detector):
    x_in, _ = id_data(256, seed=5)
    return float(detector.score(outliers(256, seed=6)).mean() - detector.score(x_in).mean())


def test_defaults_follow_the_paper():
    trainer = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), progress=False)
    # Yu & Aizawa 2019, Sec. 3.3 / Fig. 3: both heads are trained on labeled data first, then every mini-batch
    # makes step A (supervised) and step B (supervised + unlabeled discrepancy, Eq. 3 with the hinge of Eq. 5).
    assert trainer.pretrain_steps is None and trainer.pretraining
    assert trainer.schedule == "paper"
    assert trainer.margin == 1.2            # Sec. 4: m = 1.2
    assert trainer.lr == 0.1                # the paper's fine-tuning rate
    assert isinstance(trainer.detector(), Discrepancy)


def test_learning_rate_anneals_to_zero_over_the_run():
    # fastood's schedule (docs/fidelity.md: a constant 0.1 cost 5.8 points of ID accuracy on Fashion-MNIST)
    trainer = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), pretrain_steps=2, lr=0.05,
                                 progress=False)
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    trainer.fit(id_loader(), steps=6)
    # one scheduler step per mini-batch: 2 pre-training updates, then two updates (A, B) per fine-tuning batch
    per_batch = [0.025 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    assert lrs == pytest.approx(per_batch[:2] + [lr for lr in per_batch[2:] for _ in range(2)])
    constant = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), pretrain_steps=2, lr=0.05,
                                  scheduler=None, progress=False)
    constant.fit(id_loader(), steps=6)
    assert constant.optimizer.param_groups[0]["lr"] == 0.05


def test_head2_is_pretrained_until_it_matches_head1_and_nothing_unlabeled_is_drawn_meanwhile(caplog):
    model = pretrained_two_head()
    trainer = DiscrepancyTrainer(model, unlabeled=unlabeled_loader(), lr=0.05, progress=False)
    with caplog.at_level("INFO", logger="fastood.trainers.discrepancy"):
        trainer.fit(id_loader(), steps=60)
    result = trainer.pretrain_result
    assert result["reason"] == "matched" and 10 <= result["steps"] < 60
    assert result["acc2"] >= result["acc1"] - 0.01
    assert "pre-trained the heads" in caplog.text
    phases = [h["phase"] for h in trainer.history]
    assert phases == [0.0] * result["steps"] + [1.0] * (60 - result["steps"])
    assert trainer.unlabeled.batches_drawn == 60 - result["steps"]  # one unlabeled batch per fine-tuning batch
    assert "unlabeled" not in trainer.history[0]


def test_pretraining_budget_warns_when_head2_has_not_caught_up():
    trainer = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), lr=1e-6,
                                 max_pretrain_steps=3, match_window=3, match_tolerance=0.0, progress=False)
    with pytest.warns(UserWarning, match="did not match head 1 within max_pretrain_steps = 3"):
        trainer.fit(id_loader(), steps=5)
    assert trainer.pretrain_result["reason"] == "budget" and trainer.pretrain_result["steps"] == 3


@pytest.mark.parametrize("schedule, updates_per_batch", [("paper", 2), ("joint", 1)])
def test_paper_schedule_makes_a_supervised_update_before_each_combined_one(schedule, updates_per_batch):
    trainer = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), pretrain_steps=2,
                                 schedule=schedule, lr=0.05, progress=False)
    updates, losses = [], []
    trainer.optimizer.register_step_post_hook(lambda opt, args, kwargs: updates.append(trainer.step))
    original = trainer._supervised
    trainer._supervised = lambda x, y: losses.append("A") or original(x, y)
    trainer.fit(id_loader(), steps=6)
    # 2 pre-training steps (one update each), then 4 fine-tuning batches with `updates_per_batch` updates each
    assert len(updates) == 2 + 4 * updates_per_batch
    assert trainer.unlabeled.batches_drawn == 4              # step A draws no unlabeled images
    assert losses.count("A") == 2 + (4 if schedule == "paper" else 0)


def test_fine_tuning_makes_the_heads_disagree_on_ood_and_keeps_id_accuracy():
    trainer = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), lr=0.05, progress=False)
    det = trainer.detector()
    trainer.fit(id_loader(), steps=80)
    assert trainer.pretrain_result["reason"] == "matched"
    assert score_gap(det) > 0.3
    tuned = [h for h in trainer.history if h["phase"] == 1.0]
    assert sum(h["margin_reached"] for h in tuned[-5:]) / 5 > sum(h["margin_reached"] for h in tuned[:5]) / 5
    x, y = id_data(256, seed=5)
    assert (det.predict_class(x) == y).float().mean() > 0.95


def test_margin_that_cannot_be_reached_warns():
    torch.manual_seed(0)
    three = TwoHead(nn.Sequential(nn.Linear(DIM, 8), nn.ReLU()), 8, 3)
    with pytest.warns(UserWarning, match=r"margin m = 1.2 cannot be reached with 3 classes.*log\(3\)"):
        DiscrepancyTrainer(three, unlabeled=unlabeled_loader(), progress=False)
    assert math.log(4) > 1.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), progress=False)


def test_mechanism_idle_warns_when_the_heads_never_disagree():
    model = pretrained_two_head()
    model.head2.load_state_dict(model.head1.state_dict())  # identical heads: gap 0, and lr 1e-7 keeps it there
    trainer = DiscrepancyTrainer(model, unlabeled=unlabeled_loader(), pretrain_steps=0, lr=1e-7, progress=False)
    with pytest.warns(MechanismIdleWarning, match="entropy gap .* never reached 5% of the margin"):
        trainer.fit(id_loader(batch=8), steps=16)  # one epoch of 16 fine-tuning steps (>= 10 are judged)
    assert max(h["margin_reached"] for h in trainer.history) < 0.05


def test_mechanism_check_is_quiet_when_the_gap_opens():
    trainer = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), pretrain_steps=0, lr=0.1,
                                 progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechanismIdleWarning)
        trainer.fit(id_loader(batch=8), steps=16)
    assert max(h["margin_reached"] for h in trainer.history) >= 0.05


def test_resume_mid_pretraining_continues_exactly(tmp_path):
    # fit writes a checkpoint when it ends; a constant LR, since the 5-step fit's cosine is not the 24-step one's
    kw = dict(progress=False, checkpoint_every=1000, lr=0.05, scheduler=None)
    full = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), checkpoint_dir=tmp_path / "a",
                              **kw)
    full.fit(id_loader(), steps=24)
    part = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), checkpoint_dir=tmp_path / "b",
                              **kw)
    part.fit(id_loader(), steps=5)
    resumed = DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), checkpoint_dir=tmp_path / "b",
                                 **kw)
    resumed.fit(id_loader(), steps=24)
    assert full.pretrain_result is not None and resumed.pretrain_result == full.pretrain_result
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)


def test_bad_arguments():
    with pytest.raises(TypeError, match="unlabeled="):
        DiscrepancyTrainer(pretrained_two_head(), progress=False)
    with pytest.raises(ValueError, match="pretrain_steps"):
        DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), pretrain_steps=-1)
    with pytest.raises(ValueError, match="schedule"):
        DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), schedule="alternate")
    with pytest.raises(ValueError, match="max_pretrain_steps"):
        DiscrepancyTrainer(pretrained_two_head(), unlabeled=unlabeled_loader(), max_pretrain_steps=0)
