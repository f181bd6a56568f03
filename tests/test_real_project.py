"""fastood inside a real project, played as a new user would (issue 14, "Done when").

A torchvision ResNet-18 (10 classes, no download) on CIFAR-shaped data normalized with mean/std, loaders that yield
dicts, the user's own SGD and scheduler, FIG with bounds from mean/std, a resume that refuses a changed
hyperparameter, ICE with a user optimizer, and
``fastood eval`` on a ``torch.save(model)`` file, a state_dict and image folders. Tiny inputs and a few steps
keep it fast; the numbers mean nothing, the behaviour does.
"""
import json
import os
import sys
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

torchvision = pytest.importorskip("torchvision")

from fastood import cli  # noqa: E402
from fastood.data import bounds_for  # noqa: E402
from fastood.samplers.langevin import LangevinSampler  # noqa: E402
from fastood.trainers import FIGTrainer, ICETrainer, StandardTrainer  # noqa: E402
from fastood.trainers.resume import ResumeMismatch  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SIZE = 16  # CIFAR-shaped, smaller: ResNet-18's stride-32 trunk still ends in a 1x1 map


class FakeCifar(Dataset):
    """FakeData-like: random pixels in [0, 1], normalized as the project does, as dict items."""

    def __init__(self, n=20, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.pixels = torch.rand(n, 3, SIZE, SIZE, generator=g)
        self.labels = torch.arange(n) % 10  # every class present (ICE fits a Gaussian per class)
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        self.images = (self.pixels - mean) / std

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _resnet(seed=0):
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def _loader(batch=10, seed=0):
    return DataLoader(FakeCifar(seed=seed), batch_size=batch, shuffle=True)


def test_own_sgd_and_scheduler_on_dict_batches():
    model = _resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = StandardTrainer(model, optimizer=opt, progress=False,
                              scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1))
    lrs = []
    step = trainer.training_step
    trainer.training_step = lambda batch: lrs.append(opt.param_groups[0]["lr"]) or step(batch)
    trainer.fit(_loader(), steps=3)
    assert trainer.optimizer is opt and lrs == pytest.approx([0.05, 0.05, 0.005])


def test_fig_with_bounds_from_mean_and_std_and_a_resume_that_refuses_other_settings(tmp_path):
    bounds = bounds_for(MEAN, STD)
    data = FakeCifar().images
    lower, upper = (torch.tensor(v).view(1, 3, 1, 1) for v in bounds)
    assert bool((data >= lower - 1e-6).all() and (data <= upper + 1e-6).all())  # the box holds the data
    # the default [-1, 1] box is wrong for this data: one warning that names the fix
    with pytest.warns(UserWarning, match=r"bounds=fastood.data.bounds_for\(mean, std\)"):
        FIGTrainer(_resnet(), sampler=LangevinSampler(max_steps=1), progress=False).fit(_loader(), steps=1)
    sampler = LangevinSampler(bounds=bounds, max_steps=2)
    trainer = FIGTrainer(_resnet(), sampler=sampler, progress=False, checkpoint_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer.fit(_loader(), steps=1)
    # the same checkpoint_dir with another lam: refused, naming the difference, before anything is loaded
    fresh = _resnet(seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ResumeMismatch, match=r"written with lam=1\.0, but this trainer has lam=5\.0"):
        FIGTrainer(fresh, sampler=LangevinSampler(bounds=bounds, max_steps=2), lam=5.0, checkpoint_dir=tmp_path,
                   progress=False).fit(_loader(), steps=2)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    generated = sampler.sample(trainer.model, 4, (3, SIZE, SIZE))
    assert bool((generated >= lower - 1e-6).all() and (generated <= upper + 1e-6).all())
    assert float(generated.amin()) < -1.2 and float(generated.amax()) > 1.2  # the per-channel box, not [-1, 1]
    # the trainer's bounds= builds the same default sampler box
    assert FIGTrainer(_resnet(), bounds=bounds, progress=False).sampler.lower == bounds[0]


def test_ice_with_a_user_optimizer():
    outliers = DataLoader(torch.randn(10, 3, SIZE, SIZE), batch_size=5)
    model = _resnet()
    stale = torch.optim.SGD(model.parameters(), lr=1e-3)  # built before ICE swaps the fc for a Gaussian head
    with pytest.raises(ValueError, match=r"does not hold .* head\..*optimizer=lambda params"):
        ICETrainer(model, outliers=outliers, optimizer=stale, progress=False).fit(_loader(), steps=1)
    trainer = ICETrainer(_resnet(), outliers=outliers, optimizer=lambda params: torch.optim.SGD(params, lr=1e-3),
                         progress=False)
    head = dict(trainer.model.head.named_parameters())
    trainer.fit(_loader(), steps=1)  # fits the head from the features, then one step
    fitted = {k: v.detach().clone() for k, v in head.items()}
    trainer.fit(_loader(), steps=2)
    assert any(not torch.equal(fitted[k], v) for k, v in head.items())  # the head trains
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3  # no schedule attached to the user's optimizer


def _image_folder(path, n, seed, pattern):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        pixels = torch.rand(SIZE, SIZE, 3, generator=g)
        if pattern:
            pixels = (pixels * 0.2 + (torch.arange(SIZE).view(1, SIZE, 1) % 4 < 2)).clamp(0, 1)
        Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(os.path.join(path, f"{i}.png"))
    return str(path)


def test_fastood_eval_on_torch_saved_model_state_dict_and_image_folders(tmp_path, capsys, monkeypatch):
    model = _resnet().eval()
    torch.save(model, tmp_path / "resnet.pt")
    id_dir = _image_folder(tmp_path / "id" / "some-class", 6, 0, pattern=True)
    ood_dir = _image_folder(tmp_path / "noise", 6, 1, pattern=False)
    common = ["--id", str(tmp_path / "id"), "--ood", ood_dir, "--mean", ",".join(map(str, MEAN)),
              "--std", ",".join(map(str, STD)), "--device", "cpu", "--quiet", "--no-plots"]
    assert cli.main(["eval", str(tmp_path / "resnet.pt"), *common, "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "results.json").read_text())
    (row_name, row), = report["rows"].items()
    assert row_name == "model / MSP" and set(row["ood"]) == {"noise"} and report["id"].endswith("id")
    assert row["num_id"] == 6 and row["num_ood"] == {"noise": 6} and row["id_accuracy"] is None
    # the folder's images went through the user's normalization: scores equal the Python API's on them
    from fastood.data.vision import images_in
    from fastood.detectors import MSP
    from fastood.evaluation import evaluate

    x = torch.stack([images_in(id_dir, mean=MEAN, std=STD)[i][0] for i in range(6)])
    assert float(x.amin()) < -1.5  # normalized with mean/std, not mapped to [-1, 1]
    api = evaluate(MSP(model), [x], {"noise": [torch.stack([images_in(ood_dir, mean=MEAN, std=STD)[i][0]
                                                              for i in range(6)])]}, progress=False)
    assert row["ood"]["noise"]["auroc"] == pytest.approx(api.metrics["noise"]["auroc"])

    # a state_dict with --model MODULE:FACTORY
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "user_models.py").write_text(
        "import torchvision\n\ndef make():\n    return torchvision.models.resnet18(num_classes=10)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.main(["eval", str(tmp_path / "weights.pt"), "--model", "user_models:make", *common,
                     "--detector", "energy", "--out", str(tmp_path / "ev2")]) == 0
    energy = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert list(energy["rows"]) == ["model / Energy(T=1)"]
    capsys.readouterr()
    # without --model: one line saying what to pass
    assert _exit(["eval", str(tmp_path / "weights.pt"), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastood: error:") and "--model MODULE:FACTORY" in err
    # a detector the model cannot feed: one line, no traceback
    assert _exit(["eval", str(tmp_path / "resnet.pt"), *common, "--detector", "discrepancy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Discrepancy needs a model that returns (logits1, logits2)" in err
    assert "Traceback" not in err


def _exit(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def test_train_refuses_before_training_when_matplotlib_is_missing(tmp_path, capsys, monkeypatch):
    # Before: fastood train trained, then died at the end without writing any result.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    argv = ["train", "standard", "--data", "digits-0to4", "--tiny", "--steps", "1", "--out", str(out), "--quiet",
            "--device", "cpu", "--cache", str(tmp_path / "cache")]
    assert _exit(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "--no-plots" in err
    assert not out.exists()  # nothing trained, nothing written


def test_save_model_is_read_by_fastood_eval(tmp_path, capsys):
    import fastood
    from fastood.model_files import load_model

    model = _resnet().eval()
    path = fastood.save_model(model, tmp_path / "m.pt", detector="energy", image_shape=(3, SIZE, SIZE), note="mine",
                              model="resnet18")  # metadata may use any name, "model" included
    payload = load_model(path)
    assert payload["detector"] == "energy" and payload["note"] == "mine" and payload["method"] is None
    assert payload["model"] == "resnet18" and payload["image_shape"] == (3, SIZE, SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(payload["module"](x), model(x))
    with pytest.raises(ValueError, match="reserved"):
        fastood.save_model(model, tmp_path / "x.pt", module="no")
    # a model file that names no benchmark needs --data or folders
    assert _exit(["eval", str(path), "--quiet", "--no-plots", "--device", "cpu"]) == 2
    assert "pass --data NAME" in capsys.readouterr().err
