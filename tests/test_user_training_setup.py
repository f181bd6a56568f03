"""A user's own training setup is respected: optimizer, scheduler, budget, batches, labels, device (issue 14)."""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastood.trainers import ICETrainer, ManifoldTrainer, OETrainer, StandardTrainer
from fastood.trainers.resume import ResumeWarning

DIM = 4


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centers = torch.tensor([[0.6, 0.6, 0.0, 0.0], [-0.6, -0.6, 0.0, 0.0]])
    return centers[y] + 0.15 * torch.randn(n, DIM, generator=g), y


def _loader(batch=16):
    return DataLoader(TensorDataset(*_data()), batch_size=batch, shuffle=True)


def _outliers(batch=16):
    # 3 batches a pass: a checkpoint at the very end of an outlier pass does not resume on main (reported)
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(4 * torch.rand(48, DIM, generator=g) - 2), batch_size=batch, shuffle=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 2))


def _recorded_lrs(trainer, loader, **budget):
    lrs = []
    step = trainer.training_step

    def recording(batch):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        return step(batch)

    trainer.training_step = recording
    trainer.fit(loader, **budget)
    return lrs


# ------------------------------------------------------------------------------------------ optimizer / scheduler
def test_a_user_optimizer_keeps_its_learning_rate():
    # Before: StandardTrainer attached its MultiStepLR to the user's SGD (0.05 -> 0.0005) and OETrainer its cosine
    # (lr 0 after 4 steps).
    model = _model()
    lrs = _recorded_lrs(StandardTrainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                        progress=False), _loader(), steps=8)
    assert lrs == [0.05] * 8
    model = _model()
    trainer = OETrainer(model, outliers=_outliers(), optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                        progress=False)
    lrs = _recorded_lrs(trainer, _loader(), steps=4)
    assert lrs == [0.01] * 4 and trainer.optimizer.param_groups[0]["lr"] == 0.01 and trainer.scheduler is None


def test_scheduler_option_callable_instance_and_none():
    model = _model()
    trainer = StandardTrainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                              scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
                              progress=False)
    assert _recorded_lrs(trainer, _loader(), steps=6) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    trainer = StandardTrainer(model, optimizer=opt, scheduler=sched, progress=False)
    assert _recorded_lrs(trainer, _loader(), steps=3) == pytest.approx([0.2, 0.1, 0.2 / 3])
    assert trainer.scheduler is sched
    # fastood's optimizer without a schedule
    assert _recorded_lrs(StandardTrainer(_model(), lr=0.3, scheduler=None, progress=False), _loader(),
                         steps=8) == [0.3] * 8
    # fastood's optimizer, paper schedule (default)
    assert _recorded_lrs(StandardTrainer(_model(), lr=0.3, progress=False), _loader(), steps=8) == pytest.approx(
        [0.3] * 4 + [0.03] * 2 + [0.003] * 2)


def test_scheduler_and_optimizer_arguments_are_checked():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr=0.5 is for the optimizer fastood builds"):
        StandardTrainer(model, optimizer=opt, lr=0.5)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or a callable params -> optimizer, "
                                        "got list"):
        StandardTrainer(model, optimizer=[opt])
    with pytest.raises(TypeError, match="scheduler must be 'auto', 'cosine', None, a callable"):
        StandardTrainer(model, scheduler="linear")
    other = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="scheduler was built on another optimizer"):
        StandardTrainer(model, optimizer=opt, scheduler=torch.optim.lr_scheduler.StepLR(other, 2))


def test_ice_with_an_optimizer_built_before_the_head_was_replaced_is_refused():
    # Before: ICETrainer replaced the Linear head by a Gaussian head the user's optimizer did not hold; it never
    # trained, without a word.
    model = _model()
    stale = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = ICETrainer(model, outliers=_outliers(), optimizer=stale, progress=False)
    with pytest.raises(ValueError, match=r"does not hold .*head.*optimizer=lambda params: torch.optim.SGD"):
        trainer.fit(_loader(), steps=2)
    # the callable form is built over the final model: the Gaussian head trains
    trainer = ICETrainer(_model(), outliers=_outliers(), optimizer=lambda params: torch.optim.SGD(params, lr=0.01),
                         progress=False)
    head = [p for n, p in trainer.model.named_parameters() if n.startswith("head")]
    before = [p.detach().clone() for p in head]
    trainer.fit(_loader(), steps=3)
    assert head and any(not torch.equal(a, b) for a, b in zip(before, head))


def test_manifold_extend_head_with_a_stale_optimizer_is_refused():
    class Sampler:
        def sample(self, model, n, shape, context=None):
            return torch.randn(n, *shape)

    model = _model()
    stale = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = ManifoldTrainer(model, Sampler(), extend_head=True, optimizer=stale, progress=False)
    with pytest.raises(ValueError, match=r"does not hold 2 trainable parameter\(s\).*2\.weight, 2\.bias"):
        trainer.fit(_loader(), steps=1)


@pytest.mark.parametrize("budget", [{"epochs": 0.5}, {"steps": 2.7}, {"steps": 2.0}, {"epochs": 0}, {"steps": -1},
                                    {"steps": True}, {"epochs": "2"}])
def test_epochs_and_steps_must_be_positive_integers(budget):
    # Before: epochs=0.5 trained 0 steps and steps=2.7 trained 2, silently.
    (name, value), = budget.items()
    with pytest.raises((TypeError, ValueError), match=f"{name} must be a positive integer, got {value!r}"):
        StandardTrainer(_model(), progress=False).fit(_loader(), **budget)


# ------------------------------------------------------------------------------------------ budget changes on resume
def _cosine(lr, total, step):
    return lr * (1 + math.cos(math.pi * step / total)) / 2


def test_resuming_with_a_bigger_budget_continues_the_new_schedule(tmp_path):
    # Before (issue 15, item 4): the checkpoint's T_max=20 stayed and the LR climbed back up after step 20.
    first = OETrainer(_model(), outliers=_outliers(), checkpoint_dir=tmp_path, progress=False)
    _recorded_lrs(first, _loader(), steps=20)
    again = OETrainer(_model(), outliers=_outliers(), checkpoint_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match=r"budget changed from 20 to 40 steps.*continues at step 20"):
        lrs = _recorded_lrs(again, _loader(), steps=40)
    assert again.step == 40 and len(lrs) == 20
    assert lrs == pytest.approx([_cosine(1e-3, 40, s) for s in range(20, 40)], rel=1e-6, abs=1e-12)
    assert again.scheduler.state_dict()["T_max"] == 40
    # the same budget again: the checkpoint's scheduler continues exactly; the only warning says it resumed
    third = OETrainer(_model(), outliers=_outliers(), checkpoint_dir=tmp_path, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        third.fit(_loader(), steps=40)
    assert [w.category for w in caught] == [ResumeWarning]
    assert third.scheduler.state_dict()["T_max"] == 40 and third.scheduler.last_epoch == 40


def test_a_second_fit_on_the_same_trainer_follows_the_new_budget():
    trainer = OETrainer(_model(), outliers=_outliers(), progress=False)
    _recorded_lrs(trainer, _loader(), steps=8)
    with pytest.warns(UserWarning, match="budget changed from 8 to 16 steps"):
        lrs = _recorded_lrs(trainer, _loader(), steps=16)
    assert lrs == pytest.approx([_cosine(1e-3, 16, s) for s in range(8, 16)], rel=1e-6, abs=1e-12)


def test_a_user_scheduler_is_checkpointed_and_continues(tmp_path):
    def make(seed):
        model = _model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return StandardTrainer(model, optimizer=opt, checkpoint_dir=tmp_path, progress=False,
                               scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5))

    make(0).fit(_loader(), steps=4)
    lrs = _recorded_lrs(make(1), _loader(), steps=8)
    assert lrs == pytest.approx([0.05, 0.05, 0.025, 0.025])


# ------------------------------------------------------------------------------------------ batches, labels, device
def test_dict_batches_and_batch_keys():
    x, y = _data()

    class Dicts(Dataset):
        def __init__(self, image_key, label_key):
            self.keys = image_key, label_key

        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {self.keys[0]: x[i], self.keys[1]: y[i], "index": i}

    trainer = StandardTrainer(_model(), lr=0.05, progress=False)
    trainer.fit(DataLoader(Dicts("image", "label"), batch_size=16), steps=4)  # Before: KeyError: 0
    assert trainer.step == 4
    with pytest.raises(KeyError, match=r"keys \['cls', 'index', 'pic'\].*batch_keys"):
        StandardTrainer(_model(), progress=False).fit(DataLoader(Dicts("pic", "cls"), batch_size=16), steps=1)
    trainer = StandardTrainer(_model(), batch_keys=("pic", "cls"), progress=False)
    trainer.fit(DataLoader(Dicts("pic", "cls"), batch_size=16), steps=2)
    trainer = StandardTrainer(_model(), batch_fn=lambda b: (b["pic"], b["cls"]), progress=False)
    trainer.fit(DataLoader(Dicts("pic", "cls"), batch_size=16), steps=2)
    assert trainer.step == 2


def test_loader_mistakes_get_clear_errors():
    x, y = _data()
    # an image-only loader (Before: IndexError)
    with pytest.raises(ValueError, match=r"StandardTrainer.fit's loader yielded a list of 1 .* without labels"):
        StandardTrainer(_model(), progress=False).fit(DataLoader(TensorDataset(x), batch_size=16), steps=1)
    # a Dataset instead of a DataLoader (Before: "expected 4D input (got 3D input)" or worse)
    with pytest.raises(TypeError, match=r"must be a DataLoader .* got the dataset TensorDataset: wrap it"):
        StandardTrainer(_model(), progress=False).fit(TensorDataset(x, y), steps=1)
    # float (one-hot) labels
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        StandardTrainer(_model(), progress=False).fit(
            DataLoader(TensorDataset(x, nn.functional.one_hot(y).float()), batch_size=16), steps=1)


def test_labels_out_of_range_are_named():
    # Before: torch's "Target 5 is out of bounds."
    x, y = _data()
    with pytest.raises(ValueError, match=r"labels range over \[0, 5\] but the model has 2 outputs \(classes 0..1\)"):
        StandardTrainer(_model(), progress=False).fit(DataLoader(TensorDataset(x, y * 5), batch_size=16), steps=1)
    with pytest.raises(ValueError, match=r"labels must be class indices >= 0, got -1"):
        StandardTrainer(_model(), progress=False).fit(DataLoader(TensorDataset(x, y - 1), batch_size=16), steps=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    # Before: torch's driver message from deep inside model.to()
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available on this machine.*device='cpu'"):
        StandardTrainer(_model(), device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'"):
        StandardTrainer(_model(), device="tpu7")
