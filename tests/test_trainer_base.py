import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.trainers import StandardTrainer


def _problem(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _loader(ds):
    return DataLoader(ds, batch_size=16, shuffle=True)


def test_standard_trainer_learns():
    ds = _problem()
    model = _model()
    x, y = ds.tensors
    before = nn.functional.cross_entropy(model(x), y).item()
    StandardTrainer(model, lr=0.05, progress=False).fit(_loader(ds), epochs=5)
    after = nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.7 * before


def test_steps_budget_and_history():
    trainer = StandardTrainer(_model(), progress=False)
    trainer.fit(_loader(_problem()), steps=9)  # crosses an epoch boundary (6 batches per epoch)
    assert trainer.step == 9 and trainer.epoch == 1 and trainer.batch_in_epoch == 3
    assert len(trainer.history) == 9 and all("loss" in h for h in trainer.history)


def test_interrupted_run_resumes_exactly(tmp_path):
    ds = _problem()
    full = StandardTrainer(_model(), progress=False, checkpoint_dir=tmp_path / "full", checkpoint_every=1)
    full.fit(_loader(ds), steps=10)

    class Interrupt(Exception):
        pass

    class Crashing(StandardTrainer):
        def training_step(self, batch):
            if self.step == 7:
                raise Interrupt
            return super().training_step(batch)

    crashed = Crashing(_model(), progress=False, checkpoint_dir=tmp_path / "part", checkpoint_every=1)
    with pytest.raises(Interrupt):
        crashed.fit(_loader(ds), steps=10)
    resumed = StandardTrainer(_model(seed=5), progress=False, checkpoint_dir=tmp_path / "part", checkpoint_every=1)
    resumed.fit(_loader(ds), steps=10)
    assert resumed.step == 10
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        StandardTrainer("not a model")
    with pytest.raises(ValueError, match="lr"):
        StandardTrainer(_model(), lr=-1)
    t = StandardTrainer(_model(), progress=False)
    with pytest.raises(ValueError, match="epochs or steps"):
        t.fit(_loader(_problem()), epochs=1, steps=1)
    with pytest.raises(ValueError, match="empty"):
        t.fit(DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0).long()), batch_size=4), epochs=1)


def test_non_finite_loss_is_an_error():
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        StandardTrainer(model, progress=False).fit(_loader(_problem()), steps=1)


def test_standard_schedule_divides_lr_at_half_and_three_quarters():
    trainer = StandardTrainer(_model(), lr=0.1, progress=False)
    trainer.fit(_loader(_problem()), steps=8)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    lrs = []

    class Recording(StandardTrainer):
        def training_step(self, batch):
            lrs.append(self.optimizer.param_groups[0]["lr"])
            return super().training_step(batch)

    Recording(_model(), lr=0.1, progress=False).fit(_loader(_problem()), steps=8)
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def test_cosine_schedule_anneals_over_the_budget_and_resumes_where_it_stopped(tmp_path):
    lrs = []

    class Recording(StandardTrainer):
        def training_step(self, batch):
            lrs.append(self.optimizer.param_groups[0]["lr"])
            return super().training_step(batch)

    Recording(_model(), lr=0.1, scheduler="cosine", progress=False).fit(_loader(_problem()), steps=8)
    expected = [0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]
    assert lrs == pytest.approx(expected)  # not StandardTrainer's own steps: "cosine" replaces the method's schedule
    # 3 steps, then continued to 8: the schedule is rebuilt for the new budget at step 3 (Trainer's documented rule),
    # so from there on the learning rates are the 8-step run's
    lrs.clear()
    Recording(_model(), lr=0.1, scheduler="cosine", progress=False, checkpoint_dir=tmp_path,
              checkpoint_every=1).fit(_loader(_problem()), steps=3)
    Recording(_model(), lr=0.1, scheduler="cosine", progress=False, checkpoint_dir=tmp_path).fit(
        _loader(_problem()), steps=8)
    assert lrs[:3] == pytest.approx([0.05 * (1 + math.cos(math.pi * t / 3)) for t in range(3)])
    assert lrs[3:] == pytest.approx(expected[3:])
    with pytest.raises(TypeError, match="'auto', 'cosine', None"):
        StandardTrainer(_model(), scheduler="linear")


def test_resume_false_starts_over(tmp_path):
    ds = _problem()
    StandardTrainer(_model(), progress=False, checkpoint_dir=tmp_path).fit(_loader(ds), steps=4)
    again = StandardTrainer(_model(), progress=False, checkpoint_dir=tmp_path)
    again.fit(_loader(ds), steps=2, resume=False)
    assert again.step == 2 and len(again.history) == 2


def test_fit_ending_on_an_epoch_boundary_can_be_continued():
    class ConstantLR(StandardTrainer):  # the step schedule depends on the total, which changes between fits
        def configure_scheduler(self, optimizer, total_steps):
            return None

    ds = _problem()  # 6 batches per epoch
    continued = ConstantLR(_model(), progress=False)
    continued.fit(_loader(ds), epochs=1)
    assert continued.epoch == 1 and continued.batch_in_epoch == 0
    continued.fit(_loader(ds), epochs=2)
    straight = ConstantLR(_model(), progress=False)
    straight.fit(_loader(ds), epochs=2)
    assert continued.step == straight.step == 12 and continued.epoch == 2
    for a, b in zip(continued.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Augmented(torch.utils.data.Dataset):
    """Adds global-RNG noise in __getitem__, as random crops and flips do (loaded in the main process)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x + 0.1 * torch.randn_like(x), y


def test_resume_is_exact_when_the_dataset_augments_with_the_global_rng(tmp_path):
    ds = _Augmented(_problem())

    class Interrupt(Exception):
        pass

    class Crashing(StandardTrainer):
        def training_step(self, batch):
            if self.step == 8:
                raise Interrupt
            return super().training_step(batch)

    full = StandardTrainer(_model(), progress=False).fit(_loader(ds), steps=10)
    crashed = Crashing(_model(), progress=False, checkpoint_dir=tmp_path, checkpoint_every=4)
    with pytest.raises(Interrupt):
        crashed.fit(_loader(ds), steps=10)
    resumed = StandardTrainer(_model(seed=5), progress=False, checkpoint_dir=tmp_path).fit(_loader(ds), steps=10)
    assert resumed.step == 10
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _IdleWhenFlagged(StandardTrainer):
    """A trainer whose 'mechanism' is a logged flag: idle when every step of the window logged flag == 0."""

    def __init__(self, model, flag, **kwargs):
        super().__init__(model, **kwargs)
        self.flag = flag
        self.windows = []

    def training_step(self, batch):
        out = super().training_step(batch)
        out["flag"] = self.flag
        return out

    def mechanism_idle(self, logs):
        self.windows.append(len(logs))
        return None if any(h["flag"] for h in logs) else "flag stayed 0"


def test_mechanism_check_warns_once_per_trainer_over_each_epoch():
    from fastood.trainers import MechanismIdleWarning

    trainer = _IdleWhenFlagged(_model(), flag=0.0, progress=False)
    with pytest.warns(MechanismIdleWarning, match="flag stayed 0") as caught:
        trainer.fit(_loader(_problem()), epochs=2)  # 6 batches per epoch
    assert len([w for w in caught if issubclass(w.category, MechanismIdleWarning)]) == 1
    assert trainer.windows[0] == 6  # judged over a whole epoch


def test_mechanism_check_silent_when_engaged_and_judges_short_fits_whole():
    import warnings

    from fastood.trainers import MechanismIdleWarning

    trainer = _IdleWhenFlagged(_model(), flag=1.0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MechanismIdleWarning)
        trainer.fit(_loader(_problem()), steps=3)
    assert trainer.windows == [3]  # a fit shorter than an epoch is judged as a whole
