"""Cached pretrained weights (fastood.weights_cache): checksummed and atomic, never NaN, damaged files retrained."""
import os

import pytest
import torch
from torch import nn

from fastood.trainers.checkpoint import NonFiniteStateError
from fastood.weights_cache import load_cached_weights, save_cached_weights


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_round_trip_and_plain_torch_load(tmp_path):
    path = str(tmp_path / "sub" / "w.pt")
    save_cached_weights(_model(0), path)
    assert not os.path.exists(path + ".tmp")
    other = _model(1)
    assert load_cached_weights(other, path)
    for k, v in _model(0).state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
        assert torch.equal(torch.load(path, weights_only=True)[k], v)  # still a plain state dict file


def test_missing_file_is_not_loaded(tmp_path):
    assert not load_cached_weights(_model(), str(tmp_path / "none.pt"))


def test_non_finite_weights_are_not_cached_over_good_ones(tmp_path):
    path = str(tmp_path / "w.pt")
    save_cached_weights(_model(0), path)
    before = open(path, "rb").read()
    broken = _model(1)
    with torch.no_grad():
        broken[0].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"0\.weight holds 1 NaN"):
        save_cached_weights(broken, path)
    assert open(path, "rb").read() == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "other model"])
def test_damaged_file_warns_is_removed_and_leaves_the_model_untouched(tmp_path, damage):
    path = str(tmp_path / "w.pt")
    if damage == "other model":
        save_cached_weights(nn.Linear(5, 2), path)
    else:
        save_cached_weights(_model(0), path)
        data = bytearray(open(path, "rb").read())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        open(path, "wb").write(bytes(data))
    model = _model(1)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="damaged cache file"):
        assert not load_cached_weights(model, path)
    assert not os.path.exists(path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
