"""The methods as pieces (issue 21, section 1): fastood.objectives, the losses in fastood.losses, frozen_batchnorm,
check_data_range, the README's "Use in your own loop" snippet and the Lightning example."""
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastood
from fastood import losses
from fastood.models import GaussianClassifier, TwoHead
from fastood.objectives import (CMGObjective, DiscrepancyObjective, EnergyOEObjective, FIGObjective,
                                GaussianNoiseObjective, ICEObjective, ManifoldObjective, OEObjective)
from fastood.trainers import (CMGTrainer, DiscrepancyTrainer, EnergyOETrainer, FIGTrainer, GaussianNoiseTrainer,
                              ICETrainer, ManifoldTrainer, OETrainer)
from script_loader import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cnn(classes=3, bn=True):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, classes)]
    return nn.Sequential(*layers)


def batch(n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % classes


class FixedSampler:
    """A sampler returning given images (and recording what it was asked for)."""

    def __init__(self, images, bounds=(-1.0, 1.0)):
        self.images, self.calls = images, []
        self.lower, self.upper = (bounds[0],), (bounds[1],)

    def sample(self, model, n, shape, context=None):
        self.calls.append((n, tuple(shape)))
        return self.images[:n]


def entropy(logits):
    p = torch.softmax(logits, 1)
    return -(p * p.log()).sum(1)


# ------------------------------------------------------------------------------------------------ objectives
def test_fig_objective_draws_ceil_k_b_samples_and_returns_ce_minus_lam_entropy():
    model, (x, y) = cnn().eval(), batch(6)
    gen = torch.rand(4, 1, 8, 8) * 2 - 1
    sampler = FixedSampler(gen)
    loss, logs = FIGObjective(sampler, k=0.5, lam=0.7)(model, x, y)
    assert sampler.calls == [(3, (1, 8, 8))]                   # ceil(0.5 * 6)
    with torch.no_grad():
        ce = F.cross_entropy(model(x), y)
        h = entropy(model(gen[:3])).mean()
    assert float(loss.detach()) == pytest.approx(float(ce - 0.7 * h), rel=1e-5)
    assert loss.requires_grad and float(logs["ce"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(logs["gen_entropy"]) == pytest.approx(float(h), rel=1e-5)
    assert all(not (isinstance(v, torch.Tensor) and v.requires_grad) for v in logs.values())
    loss0, logs0 = FIGObjective(sampler, k=0)(model, x, y)     # k = 0: plain cross-entropy, no sampling
    assert len(sampler.calls) == 1 and set(logs0) == {"loss", "ce"}
    with pytest.raises(ValueError, match="k must be"):
        FIGObjective(sampler, k=-1)
    with pytest.raises(ValueError, match="empty ID batch"):
        FIGObjective(sampler)(model, x[:0], y[:0])


@pytest.mark.parametrize("trainer_cls, objective_cls", [(FIGTrainer, FIGObjective),
                                                        (GaussianNoiseTrainer, GaussianNoiseObjective)])
def test_the_fig_trainers_step_is_their_objective(trainer_cls, objective_cls):
    x, y = batch(8)
    trainer = trainer_cls(cnn(), k=0.5, progress=False)
    assert type(trainer.objective) is objective_cls and trainer.objective.sampler is trainer.sampler
    trainer.lam = 0.3                                           # the trainer's attributes are the objective's
    assert trainer.objective.lam == 0.3
    model = trainer.model.eval()  # running statistics fixed: both calls sample and score the same function
    torch.manual_seed(5)
    step = trainer.training_step((x, y))
    objective = objective_cls(type(trainer.sampler)(bounds=(-1.0, 1.0)), k=0.5, lam=0.3)
    torch.manual_seed(5)
    loss, logs = objective(model, x, y)
    assert float(step["loss"].detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert set(step) == set(logs)


def test_oe_and_energy_oe_objectives_equal_their_losses_and_trainers():
    model, (x, y) = cnn(), batch(6)
    x_out = torch.rand(5, 1, 8, 8)
    loss, logs = OEObjective(lam=0.5)(model, x, y, x_out)
    logits = model(torch.cat([x, x_out])).detach()
    assert float(loss.detach()) == pytest.approx(float(losses.oe_loss(logits[:6], y, logits[6:], 0.5)), rel=1e-5)
    assert float(logs["outlier_excess"]) == pytest.approx(float(logs["outlier"]) - math.log(3), rel=1e-5)
    loss, logs = EnergyOEObjective(m_in=-1.0, m_out=2.0, lam=0.1)(model, x, y, x_out)
    expected = losses.energy_oe_loss(logits[:6], y, logits[6:], -1.0, 2.0, 0.1)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    with pytest.raises(TypeError, match="outliers="):           # neither a batch nor a source
        OEObjective()(model, x, y)
    # a loader as the source: drawn per call; the trainers loop over the same objective
    outliers = DataLoader(TensorDataset(x_out), batch_size=5)
    objective = OEObjective(outliers=outliers)
    drawn, given = objective(model, x, y)[0], OEObjective()(model, x, y, x_out)[0]
    assert float(drawn.detach()) == pytest.approx(float(given.detach()), rel=1e-6)
    for trainer_cls, objective_cls in ((OETrainer, OEObjective), (EnergyOETrainer, EnergyOEObjective)):
        trainer = trainer_cls(model, outliers=outliers, progress=False)
        assert type(trainer.objective) is objective_cls and trainer.objective.outliers is trainer.outliers
        step = trainer.training_step((x, y))
        direct = objective_cls(lam=trainer.lam)(model, x, y, x_out)[0] if objective_cls is OEObjective else \
            objective_cls(m_in=trainer.m_in, m_out=trainer.m_out, lam=trainer.lam)(model, x, y, x_out)[0]
        assert float(step["loss"].detach()) == pytest.approx(float(direct.detach()), rel=1e-6)


def test_ice_objective_equals_ice_loss_and_measures_the_gradient_share():
    model = GaussianClassifier.from_model(cnn())
    x, y = batch(6)
    x_out = torch.rand(4, 1, 8, 8)
    loss, logs = ICEObjective(lam=1.0)(model, x, y, x_out, grad_share=True)
    h = model(torch.cat([x, x_out])).detach()
    assert float(loss.detach()) == pytest.approx(float(losses.ice_loss(h[:6], y, h[6:])), rel=1e-5)
    assert 0 <= logs["outlier_grad_share"] <= 1 and "outlier_grad_vs_ce" in logs
    loss.backward()                                             # the graph survived the share's autograd.grad calls
    assert model.head.means.grad is not None


def test_manifold_objective_weights_the_outlier_class():
    model, (x, y) = cnn(classes=4), batch(6)
    gen = torch.rand(6, 1, 8, 8)
    sampler = FixedSampler(gen)                                 # no type1/type2: draws the total, labeled n
    objective = ManifoldObjective(sampler, ood_weight=0.1)
    loss, logs = objective(model, x, y)
    assert sampler.calls == [(6, (1, 8, 8))]                    # 2:1:1 -> b/2 + b/2
    logits = model(torch.cat([x, gen])).detach()
    targets = torch.cat([y, torch.full((6,), 3)])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, targets, weight=weight)), rel=1e-5)
    extra = losses.extra_class_loss(logits[:6], y, logits[6:], 0.1)
    assert float(extra) == pytest.approx(float(loss.detach()), rel=1e-6)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        objective(model, x, torch.full((6,), 3))
    trainer = ManifoldTrainer(model, sampler, progress=False)
    assert type(trainer.objective) is ManifoldObjective and trainer.sampler is sampler


def test_cmg_objective_energy_and_softmax_modes():
    head = nn.Linear(5, 3)
    f, y, f_ood = torch.randn(6, 5), torch.arange(6) % 3, torch.randn(4, 5)
    objective = CMGObjective("energy")
    with pytest.raises(ValueError, match="margins"):
        objective(head, f, y, f_ood)
    m_in, m_out = objective.margins_from(head(f), head(f_ood))
    assert m_in == pytest.approx(float(torch.quantile(losses.energy(head(f).detach()).double(), 0.2)), rel=1e-6)
    loss, logs = objective(head, f, y, f_ood)
    expected = losses.cmg_energy_loss(head(f), y, head(f_ood), m_in, m_out)[0]
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert 0 <= float(logs["id_inside"]) <= 1
    head4 = nn.Linear(5, 4)
    loss, logs = CMGObjective("softmax")(head4, f, y, f_ood)
    logits = head4(torch.cat([f, f_ood])).detach()
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, torch.cat([y, torch.full((4,), 3)]))),
                                        rel=1e-5)


def test_discrepancy_objective_steps():
    model = TwoHead.from_model(cnn(bn=False))  # no BatchNorm: a joint forward equals separate ones
    x, y = batch(6)
    x_u = torch.rand(5, 1, 8, 8)
    objective = DiscrepancyObjective(margin=0.5)
    loss_a, logs_a = objective.supervised(model, x, y)
    l1, l2 = (t.detach() for t in model(x))
    assert float(loss_a.detach()) == pytest.approx(float(F.cross_entropy(l1, y) + F.cross_entropy(l2, y)), rel=1e-5)
    assert logs_a["phase"] == 0.0
    loss_b, logs_b = objective(model, x, y, x_u)
    u1, u2 = (t.detach() for t in model(x_u))
    expected = loss_a + losses.discrepancy_loss(u1, u2, 0.5)
    assert float(loss_b.detach()) == pytest.approx(float(expected.detach()), rel=1e-5) and logs_b["phase"] == 1.0
    with pytest.warns(UserWarning, match=r"margin m = 1.2 cannot be reached with 3 classes"):
        DiscrepancyObjective()(model, x, y, x_u)
    trainer = DiscrepancyTrainer(model, unlabeled=DataLoader(TensorDataset(x_u), batch_size=5), margin=0.5,
                                 progress=False)
    assert type(trainer.objective) is DiscrepancyObjective and trainer.margin == 0.5


def test_cmg_and_ice_trainers_use_their_objectives():
    from fastood.samplers import GaussianNoiseSampler

    class Noise(GaussianNoiseSampler):
        pass

    trainer = CMGTrainer(cnn(), Noise(), progress=False)
    assert type(trainer.objective) is CMGObjective and trainer.mode == "energy"
    with pytest.warns(fastood.ModelReplacedWarning):
        ice = ICETrainer(cnn(), outliers=DataLoader(TensorDataset(torch.rand(4, 1, 8, 8)), batch_size=4),
                         progress=False)
    assert type(ice.objective) is ICEObjective and ice.lam == 1.0


# ------------------------------------------------------------------------------------------------ exports
def test_every_loss_and_piece_is_exported():
    for name in ("fig_loss", "oe_loss", "energy_oe_loss", "energy", "energy_margin_loss", "ice_loss",
                 "discrepancy_loss", "extra_class_loss", "cmg_energy_loss"):
        assert callable(getattr(losses, name)) and name in losses.__all__
    from fastood.trainers import cmg, fig

    assert fig.fig_loss is losses.fig_loss and cmg.cmg_energy_loss is losses.cmg_energy_loss
    import fastood.objectives as objectives

    for name in objectives.__all__:
        assert getattr(fastood, name) is getattr(objectives, name), name
        assert getattr(objectives, name).__doc__, name
    assert fastood.frozen_batchnorm.__doc__ and fastood.check_data_range.__doc__
    assert issubclass(fastood.DataRangeWarning, UserWarning) and issubclass(fastood.ResumeWarning, UserWarning)


def test_the_objectives_do_not_import_the_trainers():
    code = ("import sys, fastood.objectives, fastood.losses, fastood.data_range; "
            "print(sorted(m for m in sys.modules if m.startswith('fastood.trainers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------ frozen_batchnorm
def test_frozen_batchnorm_freezes_and_restores_each_layers_mode():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model.train()
    model[4].eval()                                             # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    stats = [b.clone() for b in model.buffers()]
    with fastood.frozen_batchnorm(model) as same:
        assert same is model
        assert not model[1].training and not model[4].training and model[2].training and model.training
        model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # running statistics untouched
    assert model[1].weight.grad is not None                     # the affine weights still train
    with pytest.raises(RuntimeError, match="boom"):
        with fastood.frozen_batchnorm(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with fastood.frozen_batchnorm("model"):
            pass


# ------------------------------------------------------------------------------------------------ check_data_range
def test_check_data_range_public():
    pixels = torch.rand(8, 3, 4, 4)
    with pytest.warns(fastood.DataRangeWarning, match=r"at most half of the box.*bounds_for") as caught:
        assert fastood.check_data_range(pixels, (-1.0, 1.0)) is False
    assert caught[0].filename == __file__                       # points at this line, not inside fastood
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastood.check_data_range(pixels, (0.0, 1.0)) is True
        assert fastood.check_data_range(pixels * 2 - 1, ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))) is True
    with pytest.warns(fastood.DataRangeWarning, match=r"channel\(s\) 2"):  # only the last channel is thin
        squeezed = torch.cat([pixels[:, :2] * 2 - 1, pixels[:, 2:] * 0.5], 1)
        fastood.check_data_range(squeezed, (-1.0, 1.0))
    with pytest.warns(fastood.DataRangeWarning, match="outside the data's range"):
        fastood.check_data_range(pixels * 6 - 3, (-1.0, 1.0))
    with pytest.raises(ValueError, match="3 channels"):
        fastood.check_data_range(pixels, ((0.0, 0.0), (1.0, 1.0)))
    with pytest.raises(ValueError, match="lower < upper"):
        fastood.check_data_range(pixels, (1.0, 0.0))
    with pytest.raises(ValueError, match=r"\[B, C, \.\.\.\]"):
        fastood.check_data_range(torch.rand(8), (0.0, 1.0))


def test_an_objective_checks_its_first_batch_once():
    model, (x, y) = cnn().eval(), batch(6)
    objective = FIGObjective(FixedSampler(torch.rand(4, 1, 8, 8)), k=0.5)
    with pytest.warns(fastood.DataRangeWarning, match="FIGObjective: .*at most half") as caught:
        objective(model, (x + 1) / 2, y)                        # pixels in [0, 1], box [-1, 1]
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective(model, (x + 1) / 2, y)                        # once


# ------------------------------------------------------------------------------------------------ README, Lightning
def readme_block(section: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    assert len(blocks) == 1, f"expected one python block under '## {section}', found {len(blocks)}"
    return blocks[0]


def test_readme_own_loop_snippet_runs(capsys):
    code = readme_block("Use in your own loop")
    namespace = {"__name__": "readme"}
    torch.manual_seed(0)
    exec(compile(code, "README.md: Use in your own loop", "exec"), namespace)
    model, fig = namespace["model"], namespace["fig"]
    assert isinstance(fig, FIGObjective) and namespace["logs"]["loss"] == namespace["logs"]["loss"]
    bn = model[1]
    assert bn.training and int(bn.num_batches_tracked) == 1     # frozen for FIG (restored after); the OE step counted
    assert "gen_entropy" in capsys.readouterr().out


def _load_example(name):
    return load_script(f"examples/{name}.py")


def test_lightning_example_fine_tunes_with_batchnorm_frozen():
    pytest.importorskip("lightning", reason="lightning is not installed (pip install lightning; the Makefile's "
                                            "venv target installs it)")
    example = _load_example("lightning_fig")
    torch.manual_seed(0)
    model = example.small_cnn(classes=5)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    weights = model[0].weight.detach().clone()
    loader = DataLoader(example.fake_data(n=16), batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # Lightning's own hints (workers, loggers)
        module = example.fit(model, loader, steps=2, sampler=fastood.samplers.LangevinSampler(max_steps=3))
    assert not torch.equal(weights, model[0].weight)            # it trained
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # BatchNorm statistics untouched
    assert all(m.training for m in model.modules())             # Lightning's train mode, BatchNorm's restored
    assert {"train/loss", "train/ce", "train/gen_entropy", "train/gen_steps"} <= set(module.logged)
    assert all(math.isfinite(v) for v in module.logged.values())
