"""LangevinSampler.sample called on one model from two threads at once (issue 15, item 7)."""
import threading

import pytest
import torch
from torch import nn

from fastood.samplers.langevin import LangevinSampler

SHAPE = (1, 6, 6)


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 3))


@pytest.mark.parametrize("fold_batchnorm", [True, False])
@pytest.mark.parametrize("shared_sampler", [True, False])
def test_two_threads_sample_one_model(fold_batchnorm, shared_sampler):
    """The first call waits in its first forward until the second call forwards too (or 1 s passes: with the lock,
    the second call cannot start before the first ends); the second call then waits until the first has
    returned. Without serialization this interleaving makes the second call restore the frozen state the first
    one saw (parameters left requires_grad=False, model left in eval mode) or break the folded view's trace."""
    model = tiny_cnn().train()
    model[0].weight.requires_grad_(False)            # a mixed set of flags, restored exactly
    model[1].eval()                                  # and a submodule with its own mode
    expected_flags = [p.requires_grad for p in model.parameters()]
    expected_modes = [m.training for m in model.modules()]
    first_done, second_forwarded = threading.Event(), threading.Event()
    roles, waited = {}, []

    def hook(module, inputs):   # on the head: fires with and without BatchNorm folding
        role = roles.get(threading.get_ident())
        if role == "first" and not waited:
            waited.append(True)
            second_forwarded.wait(1.0)
        elif role == "second":
            second_forwarded.set()
            first_done.wait(5.0)

    model[-1].register_forward_pre_hook(hook)
    samplers = [LangevinSampler(max_steps=3, fold_batchnorm=fold_batchnorm, early_stop=None, noise=None)] * 2
    if not shared_sampler:
        samplers[1] = LangevinSampler(max_steps=3, fold_batchnorm=fold_batchnorm, early_stop=None, noise=None)
    results, errors = {}, []
    first_started = threading.Event()

    def call(role, sampler):
        roles[threading.get_ident()] = role
        try:
            if role == "first":
                first_started.set()
            results[role] = (sampler.sample(model, 4, SHAPE), dict(sampler.stats))
        except Exception as exc:  # noqa: BLE001 - reported below with the role
            errors.append((role, repr(exc)))
        finally:
            if role == "first":
                first_done.set()

    first = threading.Thread(target=call, args=("first", samplers[0]))
    second = threading.Thread(target=call, args=("second", samplers[1]))
    first.start()
    first_started.wait(5.0)
    second.start()
    first.join(30.0)
    second.join(30.0)
    assert not first.is_alive() and not second.is_alive()
    assert errors == []
    for role in ("first", "second"):
        x, stats = results[role]
        assert x.shape == (4,) + SHAPE and torch.isfinite(x).all()
        assert stats["steps"].tolist() == [3] * 4
        assert stats["folded"] == (1 if fold_batchnorm else 0)
    assert [p.requires_grad for p in model.parameters()] == expected_flags
    assert [m.training for m in model.modules()] == expected_modes
    assert all(p.grad is None for p in model.parameters())
