"""bench/vernekar_mechanism.py: which cached n+1 networks it finds, and p(n+1) per outlier type on a real set."""
import os

import pytest
import torch

from fastood.data.real import available
from script_loader import load_script


def _module():
    return load_script("bench/vernekar_mechanism.py")


def test_networks_parses_the_cache_names_of_one_set_and_seed(tmp_path):
    mech = _module()
    for name in ("n1_mnist-0to4_s0_e6_lr0.01_authors_c3.pt", "n1_mnist-0to4_s0_e2_lr0.01_paper_c3.pt",
                 "n1_mnist-0to4_s0_e2_lr0.01_sgd_authors_c3.pt", "n1_mnist-0to4_s1_e2_lr0.01_authors_c3.pt",
                 "n1_mnist_s0_e2_lr0.01_authors_c3.pt", "plain_mnist-0to4_s0_e2_lr0.01.pt"):
        (tmp_path / name).write_bytes(b"")
    found = mech.networks(str(tmp_path), "mnist-0to4", 0)
    assert [(e, b, c, os.path.basename(p)) for e, b, c, p in found] == [
        (2, "paper", 3, "n1_mnist-0to4_s0_e2_lr0.01_paper_c3.pt"),
        (6, "authors", 3, "n1_mnist-0to4_s0_e6_lr0.01_authors_c3.pt")]


def test_outlier_probability_is_the_softmax_of_the_last_output():
    mech = _module()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    x = torch.randn(7, 1, 4, 4)
    assert torch.allclose(mech.outlier_probability(model, x, 3, batch=3), model(x).softmax(1)[:, 3])


@pytest.mark.skipif(not available("mnist"), reason="MNIST is not in the data root (fastood data fetch)")
def test_prints_one_line_per_cached_network(tmp_path, capsys):
    from fastood.models import VernekarCNN, VernekarCVAE

    mech = _module()
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    torch.save(VernekarCVAE(5, 8).state_dict(), models / "cvae_mnist-0to4_s0_e3.pt")
    for epochs in (2, 6):
        torch.save(VernekarCNN(6).state_dict(), models / f"n1_mnist-0to4_s0_e{epochs}_lr0.01_authors_c3.pt")
    assert mech.main(["--out", str(tmp_path), "--sets", "mnist-0to4", "-n", "32", "--fit-n", "64"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mnist-0to4 |")]
    assert [ln.split(" | ")[1] for ln in lines] == ["2", "6"]
    assert mech.main(["--out", str(tmp_path / "empty"), "--sets", "mnist-0to4"]) == 1
