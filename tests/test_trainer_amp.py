"""Trainers' ``amp=True`` on CPU (issue 22): bfloat16 autocast of the training step where the CPU computes bfloat16
natively, float32 with an AmpIgnoredWarning where it does not; before, amp was silently dropped on every CPU."""
import warnings

import pytest
import torch
from torch import nn

import fastood
import fastood.samplers.precision as P
from fastood.trainers.base import AmpIgnoredWarning
from fastood.models import TwoHead
from fastood.trainers.discrepancy import DiscrepancyTrainer
from fastood.trainers.standard import StandardTrainer


class DtypeRecorder(nn.Module):
    """A linear classifier that records the dtype of its logits in training mode (autocast casts a Linear's
    output to bfloat16 when enabled)."""

    def __init__(self, features=12, classes=3):
        super().__init__()
        self.fc = nn.Linear(features, classes)
        self.seen = []

    def forward(self, x):
        out = self.fc(x.flatten(1))
        if self.training:
            self.seen.append(out.dtype)
        return out


def _loader(n=16, features=12, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, features, generator=g) * 2 - 1
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (True, "test: native"))


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: (False, "test: no AVX512-BF16"))


def test_amp_on_a_native_cpu_runs_the_step_in_bfloat16(native):
    model = DtypeRecorder()
    trainer = StandardTrainer(model, amp=True, progress=False, handle_signals=False)
    assert trainer.amp is True and "bf16" in trainer.amp_info and "test: native" in trainer.amp_info
    trainer.fit(_loader(), steps=2)
    assert model.seen == [torch.bfloat16, torch.bfloat16]
    assert model.fc.weight.dtype == torch.float32           # autocast: the weights and the optimizer stay float32
    assert torch.isfinite(model.fc.weight).all()


def test_amp_on_a_cpu_without_native_bfloat16_warns_and_trains_float32(emulated):
    model = DtypeRecorder()
    with pytest.warns(AmpIgnoredWarning, match="no native bfloat16.*test: no AVX512-BF16"):
        trainer = StandardTrainer(model, amp=True, progress=False, handle_signals=False)
    assert trainer.amp is False and trainer.amp_info.startswith("off (asked")
    trainer.fit(_loader(), steps=1)
    assert model.seen == [torch.float32]


def test_amp_off_is_float32_and_silent(native):
    model = DtypeRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AmpIgnoredWarning)
        trainer = StandardTrainer(model, progress=False, handle_signals=False)
    assert trainer.amp is False and trainer.amp_info == "off"
    trainer.fit(_loader(), steps=1)
    assert model.seen == [torch.float32]


def test_amp_must_be_a_bool():
    with pytest.raises(TypeError, match="amp must be True or False, got 'yes'"):
        StandardTrainer(DtypeRecorder(), amp="yes", progress=False)


def test_two_head_trainer_step_a_uses_the_same_autocast(native):
    """DiscrepancyTrainer's step A had its own CUDA-only autocast: it now follows the trainer's amp as well."""

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 8)
            self.seen = []

        def forward(self, x):
            h = self.fc(x.flatten(1))
            if self.training:
                self.seen.append(h.dtype)
            return h

    body = Body()
    model = TwoHead(body, 8, 4)   # 4 classes: the paper margin 1.2 < log 4
    trainer = DiscrepancyTrainer(model, unlabeled=_loader(), amp=True, progress=False, handle_signals=False)
    trainer._step_a((*next(iter(_loader())),))
    assert body.seen and set(body.seen) == {torch.bfloat16}


def test_warning_class_is_exported():
    assert fastood.AmpIgnoredWarning is AmpIgnoredWarning
