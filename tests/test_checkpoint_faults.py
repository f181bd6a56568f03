"""Faults a long training run meets: signals, non-finite data or models, broken disks and files, resuming the
wrong run. Each test reproduces one fault and checks that no work is lost and nothing broken is saved."""
import errno
import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastood.trainers.base as base
from fastood import cli
from fastood.trainers import StandardTrainer
from fastood.trainers.base import Trainer
from fastood.trainers.checkpoint import (CheckpointError, NonFiniteStateError, load_checkpoint_file,
                                         save_checkpoint_file, verify_checkpoint_file)
from fastood.trainers.interrupt import TrainingInterrupted
from fastood.trainers.resume import ResumeMismatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def _mlp(seed=0, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _loader(ds, batch=16):
    return DataLoader(ds, batch_size=batch, shuffle=False)


def _trainer(model=None, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("lr", 0.05)
    return StandardTrainer(_mlp() if model is None else model, **kwargs)


# ------------------------------------------------------------------ 1. signals and wall-clock checkpoints
class _SignalAt(StandardTrainer):
    """Sends ``signum`` to its own process during the step that starts at ``at``."""

    at, signum = 3, signal.SIGINT

    def training_step(self, batch):
        if self.step == self.at:
            os.kill(os.getpid(), self.signum)
        return super().training_step(batch)


def test_sigint_finishes_the_step_writes_the_checkpoint_and_resumes_exactly(tmp_path):
    # the handler in place before fit (Python's default_int_handler, or SIG_IGN when the test run itself was started
    # in the background, e.g. under nohup)
    before = signal.getsignal(signal.SIGINT)
    straight = _trainer().fit(_loader(_data()), steps=8)
    interrupted = _SignalAt(_mlp(), lr=0.05, progress=False, checkpoint_dir=tmp_path, checkpoint_every=100)
    with pytest.raises(TrainingInterrupted) as info:
        interrupted.fit(_loader(_data()), steps=8)
    assert info.value.signal == "SIGINT" and info.value.step == 4 and isinstance(info.value, KeyboardInterrupt)
    assert str(tmp_path) in str(info.value)
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back
    resumed = _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=8)
    assert resumed.resumed.step == 4
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


_SIGTERM_SCRIPT = r"""
import os, signal, sys, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastood.trainers import StandardTrainer

class Pre(StandardTrainer):
    def training_step(self, batch):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # pre-emption
        return super().training_step(batch)

torch.manual_seed(0)
x = torch.randn(64, 4)
loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8)
Pre(nn.Linear(4, 2), progress=False, checkpoint_dir=sys.argv[1], checkpoint_every=100).fit(loader, steps=8)
"""


def test_sigterm_writes_the_checkpoint_before_the_process_ends(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode != 0
    assert "SIGTERM" in proc.stderr and "checkpoint written to" in proc.stderr
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 3


def test_sigint_then_sigterm_is_one_request_and_a_repeated_signal_aborts():
    from fastood.trainers.interrupt import StopSignals

    with StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM after the terminal's SIGINT
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="twice"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_checkpoint_minutes_writes_on_wall_clock_time(tmp_path, monkeypatch):
    clock = [1000.0]

    def fake_monotonic():
        clock[0] += 25.0  # every reading is 25 s later: a slow step
        return clock[0]

    monkeypatch.setattr(base.time, "monotonic", fake_monotonic)
    saved_at = []

    class Recording(StandardTrainer):
        def save_checkpoint(self):
            saved_at.append(self.step)
            super().save_checkpoint()

    Recording(_mlp(), progress=False, checkpoint_dir=tmp_path, checkpoint_every=1000,
              checkpoint_minutes=1).fit(_loader(_data()), steps=8)
    assert saved_at[-1] == 8 and len(saved_at) >= 3  # some mid-run writes, though checkpoint_every is never hit
    assert all(0 < s < 8 for s in saved_at[:-1])
    with pytest.raises(ValueError, match="checkpoint_minutes"):
        _trainer(checkpoint_minutes=0)


def test_cli_promises_resume_only_when_a_checkpoint_exists(tmp_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "train", interrupted)
    assert cli.main(["train", "oe", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing to resume" in err
    ckpt = tmp_path / "run" / "checkpoints" / "oe"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.pt").write_bytes(b"x")
    assert cli.main(["train", "oe", "--out", str(tmp_path / "run")]) == 130
    assert "--resume" in capsys.readouterr().err


def test_cli_reports_a_sigterm_checkpoint_with_status_143(tmp_path, monkeypatch, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"x")

    def stopped(args):
        raise TrainingInterrupted("SIGTERM", 20, 100, str(path))

    monkeypatch.setitem(cli._COMMANDS, "train", stopped)
    assert cli.main(["train", "oe", "--out", str(tmp_path)]) == 143
    err = capsys.readouterr().err
    assert "SIGTERM after step 20 of 100" in err and str(path) in err and "--resume" in err


# ------------------------------------------------------------------ 2. nothing non-finite is saved
def _digits_with_one_huge_pixel(bad_index):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    keep = y < 5
    images = torch.tensor(x[keep][:128], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    images[bad_index, 0, 3, 3] = 1e20
    return TensorDataset(images, torch.tensor(y[keep][:128]))


def _digit_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 5))


def test_an_inf_running_var_is_never_saved_and_the_good_checkpoint_stays(tmp_path):
    data = _digits_with_one_huge_pixel(bad_index=3 * 16)  # in the 4th batch: after the checkpoint at step 2
    trainer = StandardTrainer(_digit_cnn(), lr=0.05, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(NonFiniteStateError, match="running_var") as info:
        trainer.fit(_loader(data), steps=8)
    assert "'1.running_var'" in info.value.tensor_name and "step 4" in str(info.value)
    kept = load_checkpoint_file(tmp_path / "checkpoint.pt")
    assert kept["step"] == 2 and all(bool(torch.isfinite(v).all()) for v in kept["model"].values()
                                     if v.is_floating_point())
    # Without a checkpoint_dir the broken model is not returned silently either.
    with pytest.raises(NonFiniteStateError, match="running_var"):
        StandardTrainer(_digit_cnn(), lr=0.05, progress=False).fit(_loader(data), steps=8)


def test_non_finite_optimizer_state_is_named():
    trainer = _trainer()
    trainer.fit(_loader(_data()), steps=1)
    next(iter(trainer.optimizer.state.values()))["momentum_buffer"].fill_(float("nan"))
    with pytest.raises(NonFiniteStateError, match="optimizer state 'momentum_buffer' of parameter '0.weight'"):
        trainer.check_finite()


# ------------------------------------------------------------------ 3. a non-finite loss
def _with_nan_image(index):
    ds = _data()
    ds.tensors[0][index, 2] = float("nan")
    return ds


def test_non_finite_loss_restores_the_buffers_and_names_the_batch_and_the_input():
    seen = []

    class Recording(StandardTrainer):
        def training_step(self, batch):
            seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
            return super().training_step(batch)

    trainer = Recording(_mlp(), lr=0.05, progress=False)
    with pytest.raises(FloatingPointError) as info:
        trainer.fit(_loader(_with_nan_image(2 * 16 + 5)), steps=4)
    message = str(info.value)
    assert "step 2" in message and "batch 2 of the epoch" in message and "input batch itself holds 1 NaN" in message
    for key, value in trainer.model.state_dict().items():  # as before the bad batch, NaN-free
        assert torch.equal(value, seen[-1][key]), key


def test_a_diverging_run_is_told_apart_from_bad_input():
    model = _mlp()
    with torch.no_grad():
        model[3].weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="input batch is finite, so training diverged"):
        StandardTrainer(model, progress=False).fit(_loader(_data()), steps=1)


def test_skip_nonfinite_skips_counts_and_reports(tmp_path):
    with pytest.warns(RuntimeWarning, match="Skipped"):
        trainer = _trainer(skip_nonfinite=True, checkpoint_dir=tmp_path).fit(_loader(_with_nan_image(20)), steps=4)
    assert trainer.step == 4
    assert trainer.skipped_batches == [{"step": 1, "epoch": 0, "batch": 1, "input_finite": False}]
    assert trainer.history[-1]["skipped_nonfinite"] == 1 and len(trainer.history) == 3
    assert all(bool(torch.isfinite(v).all()) for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["skipped_batches"] == trainer.skipped_batches


def test_cli_errors_are_one_line(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "standard", "--lr", "1e39"])
    assert "--lr: expected a finite number > 0" in capsys.readouterr().err

    with pytest.raises(ValueError, match="lr must be a finite number > 0 .at most 3.4e"):
        _trainer(lr=1e39)

    def diverged(args):
        raise FloatingPointError("StandardTrainer: non-finite loss nan at step 3\nsecond line")

    monkeypatch.delenv("FASTOOD_TRACEBACK", raising=False)
    monkeypatch.setitem(cli._COMMANDS, "train", diverged)
    assert cli.main(["train", "standard", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastood: error: FloatingPointError: StandardTrainer: non-finite")
    assert "Traceback" not in err


# ------------------------------------------------------------------ 9. disks and files
def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    calls = []

    class Counting(StandardTrainer):
        def training_step(self, batch):
            calls.append(1)
            return super().training_step(batch)

    bad = blocker / "checkpoints"
    with pytest.raises(CheckpointError, match=f"{bad} is not writable"):
        Counting(_mlp(), progress=False, checkpoint_dir=bad).fit(_loader(_data()), steps=2)
    assert calls == []


def test_cli_checks_out_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["train", "standard", "--out", str(blocker / "run")])
    assert f"--out folder {blocker / 'run'} is not writable" in capsys.readouterr().err


def test_disk_full_names_the_file_removes_the_tmp_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left") as info:
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert str(tmp_path / "checkpoint.pt") in str(info.value)
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    assert load_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 2


def test_write_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    save_checkpoint_file({"model": {}}, tmp_path / "c.pt")
    assert events == [("fsync", False), ("replace",), ("fsync", True)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_damaged_checkpoints_are_errors_naming_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x80\x04not a checkpoint at all" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=4)
    if damage == "flip":
        with pytest.raises(CheckpointError, match="checksum"):
            verify_checkpoint_file(path)


def test_checkpoints_stay_plain_torch_files_and_older_files_load(tmp_path):
    _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    assert verify_checkpoint_file(tmp_path / "checkpoint.pt") is True
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {"w": torch.ones(2)}}, legacy)  # written before checksums existed
    assert verify_checkpoint_file(legacy) is False and load_checkpoint_file(legacy)["model"]["w"].sum() == 2


# ------------------------------------------------------------------ issue 14.3: resume is explicit
def test_resume_says_so_and_sets_resumed(tmp_path, caplog):
    first = _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=3)
    assert first.resumed is None
    with caplog.at_level("INFO", logger="fastood.trainers"):
        again = _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=5)
    assert again.resumed == (str(tmp_path / "checkpoint.pt"), 3, 5) and again.step == 5
    assert f"resumed from {tmp_path / 'checkpoint.pt'} at step 3 of 5" in caplog.text


@pytest.mark.parametrize("change, expected", [
    (dict(lr=0.01), "lr=0.05, but this trainer has lr=0.01"),
    (dict(momentum=0.5), "momentum=0.9, but this trainer has momentum=0.5"),
    (dict(model=_mlp(hidden=6)), "'0.weight' has shape (8, 4) there and (6, 4) in the model"),
    (dict(model=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))), "another model structure"),
])
def test_resume_refuses_other_hyperparameters_or_models(tmp_path, change, expected):
    _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2)
    kwargs = dict(lr=0.05, progress=False, checkpoint_dir=tmp_path)
    kwargs.update(change)
    model = kwargs.pop("model", _mlp())
    with pytest.raises(ResumeMismatch) as info:
        StandardTrainer(model, **kwargs).fit(_loader(_data()), steps=4)
    assert expected in str(info.value) and "resume=False" in str(info.value)
    # Run settings may change: progress, checkpoint cadence, device.
    _trainer(checkpoint_dir=tmp_path, checkpoint_every=7, checkpoint_minutes=5).fit(_loader(_data()), steps=3)


def test_resume_refuses_another_sampler_setting(tmp_path):
    """A sampler's own constructor arguments are part of the trainer's record: resuming FIG with another Langevin
    step size (or another sampler class) is refused, naming the argument; how the chains run (BatchNorm folding)
    may change."""
    from fastood.models import SmallCNN
    from fastood.samplers.langevin import LangevinSampler
    from fastood.samplers.noise import GaussianNoiseSampler
    from fastood.trainers.fig import FIGTrainer

    torch.manual_seed(0)
    data = TensorDataset(torch.rand(32, 1, 12, 12) * 2 - 1, torch.randint(0, 3, (32,)))

    def fig(sampler):
        torch.manual_seed(0)
        model = SmallCNN(in_channels=1, num_classes=3, image_size=12, width=4)
        return FIGTrainer(model, sampler=sampler, progress=False, checkpoint_dir=tmp_path)

    fig(LangevinSampler(max_steps=2)).fit(_loader(data), steps=1)
    with pytest.raises(ResumeMismatch, match=r"sampler\.step_size=0\.1, but this trainer has sampler\.step_size=0\.05"):
        fig(LangevinSampler(max_steps=2, step_size=0.05)).fit(_loader(data), steps=2)
    with pytest.raises(ResumeMismatch, match="sampler class='LangevinSampler', but this trainer has sampler class="
                                             "'GaussianNoiseSampler'"):
        fig(GaussianNoiseSampler()).fit(_loader(data), steps=2)
    assert fig(LangevinSampler(max_steps=2, fold_batchnorm=False)).fit(_loader(data), steps=2).resumed


def test_resume_refuses_another_method_but_accepts_a_subclass_of_the_same(tmp_path):
    class OwnMethod(Trainer):
        def training_step(self, batch):
            x, y = batch
            return {"loss": nn.functional.cross_entropy(self.net(x), y)}

    _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2)
    with pytest.raises(ResumeMismatch, match="written by StandardTrainer, but this trainer is OwnMethod"):
        OwnMethod(_mlp(), lr=0.05, progress=False, checkpoint_dir=tmp_path).fit(_loader(_data()), steps=3)

    class Logged(StandardTrainer):  # the same method with a hook
        pass

    assert Logged(_mlp(), lr=0.05, progress=False, checkpoint_dir=tmp_path).fit(_loader(_data()), steps=3).resumed


def test_resume_modes(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resume=True\) needs a checkpoint"):
        _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=1, resume=True)
    with pytest.raises(ValueError, match="resume must be"):
        _trainer().fit(_loader(_data()), steps=1, resume="yes")
    _trainer(checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2)
    fresh = _trainer(checkpoint_dir=tmp_path, lr=0.01).fit(_loader(_data()), steps=1, resume=False)
    assert fresh.resumed is None and fresh.step == 1  # other hyperparameters are fine when starting afresh
    assert _trainer(lr=0.01, checkpoint_dir=tmp_path).fit(_loader(_data()), steps=2, resume=True).resumed.step == 1


def test_hyperparameters_record_validated_values():
    from fastood.trainers.fig import FIGTrainer

    t = FIGTrainer(_mlp(), lam=1, progress=False, checkpoint_dir="unused")
    assert t.hyperparameters["lam"] == 1.0 and t.hyperparameters["lr"] == FIGTrainer.default_lr
    assert "checkpoint_dir" not in t.hyperparameters and "progress" not in t.hyperparameters
    assert t.hyperparameters["freeze_bn"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert FIGTrainer(_mlp(), lr=FIGTrainer.default_lr, lam=1.0, progress=False).hyperparameters == \
            {k: v for k, v in t.hyperparameters.items()}


def test_cli_fault_options_reach_the_trainers_and_the_process_group():
    from types import SimpleNamespace

    from fastood import demo

    args = cli.build_parser().parse_args(["train", "oe", "--checkpoint-minutes", "7.5", "--skip-nonfinite",
                                          "--ddp-timeout", "30", "--sync-bn"])
    config = demo.RunConfig.from_args(args, methods=["oe"])
    assert (config.checkpoint_minutes, config.skip_nonfinite, config.ddp_timeout, config.sync_bn) == (7.5, True, 30, True)
    ctx = SimpleNamespace(config=config, device="cpu", checkpoint_dir=lambda method: f"out/{method}")
    kwargs = demo.Context.trainer_kwargs(ctx, "oe")
    assert kwargs["checkpoint_minutes"] == 7.5 and kwargs["skip_nonfinite"] and kwargs["sync_bn"]
    assert demo.RunConfig().ddp_timeout == 1800.0 and demo.RunConfig().checkpoint_minutes is None
