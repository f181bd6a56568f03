"""ODIN, Mahalanobis and DRF share one epsilon rule (fastood.detectors._perturbation.InputPerturbation)."""
import pytest
import torch
from torch import nn

from fastood.detectors import DRF, ODIN, Mahalanobis
from fastood.detectors._perturbation import InputPerturbation


def _model():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("cls", [ODIN, Mahalanobis, DRF])
def test_epsilon_rule_is_shared(cls):
    assert issubclass(cls, InputPerturbation)
    det = cls(_model(), epsilon=0)
    assert det.epsilon == 0.0 and isinstance(det.epsilon, float) and det.needs_input_grad is False
    assert cls(_model(), epsilon=0.002).needs_input_grad is True
    for bad in (-0.1, "0.1", None, True, float("nan")):
        with pytest.raises(ValueError, match=r"epsilon must be a number >= 0, got"):
            cls(_model(), epsilon=bad)


@pytest.mark.parametrize("cls", [ODIN, Mahalanobis, DRF])
def test_replace_checks_epsilon_too(cls):
    det = cls(_model())
    with pytest.raises(ValueError, match="epsilon must be a number >= 0, got -1"):
        det.replace(epsilon=-1)
    assert det.replace(epsilon=0.01).needs_input_grad is True


def test_odin_still_checks_its_temperature():
    with pytest.raises(ValueError, match="T must be a number > 0, got 0"):
        ODIN(_model(), T=0)
    assert ODIN(_model(), T=5).T == 5.0
