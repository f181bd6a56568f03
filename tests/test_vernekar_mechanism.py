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
                 "n1_mnist_s0_e2_lr0.01_authors_c3.pt", "plain_mnist-0to4_s0_e2_lr0.01.pt",
                 "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_zmean_sh1.5_ellauthors.pt", "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_sh2.pt",
                 "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_zmean.pt"):
        (tmp_path / name).write_bytes(b"")
    found = mech.networks(str(tmp_path), "mnist-0to4", 0)
    assert [(e, b, c, v, os.path.basename(p)) for e, b, c, v, p in found] == [
        (2, "paper", 3, ("sample", 1.0, "cholesky"), "n1_mnist-0to4_s0_e2_lr0.01_paper_c3.pt"),
        (6, "authors", 3, ("mean", 1.0, "cholesky"), "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_zmean.pt"),
        (6, "authors", 3, ("mean", 1.5, "authors"), "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_zmean_sh1.5_ellauthors.pt"),
        (6, "authors", 3, ("sample", 1.0, "cholesky"), "n1_mnist-0to4_s0_e6_lr0.01_authors_c3.pt"),
        (6, "authors", 3, ("sample", 2.0, "cholesky"), "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_sh2.pt")]


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
    torch.save(VernekarCVAE(5, 8).state_dict(), models / "cvae_mnist-0to4_s0_e3_zmean.pt")
    for epochs in (2, 6):
        torch.save(VernekarCNN(6).state_dict(), models / f"n1_mnist-0to4_s0_e{epochs}_lr0.01_authors_c3.pt")
    torch.save(VernekarCNN(6).state_dict(), models / "n1_mnist-0to4_s0_e6_lr0.01_authors_c3_zmean_sh1.5_ellauthors.pt")
    torch.save(VernekarCNN(6).state_dict(), models / "n1_mnist-0to4_s0_e6_lr0.01_authors_c4_sh2.pt")  # no CVAE
    assert mech.main(["--out", str(tmp_path), "--sets", "mnist-0to4", "-n", "32", "--fit-n", "64"]) == 0
    out = capsys.readouterr().out
    lines = [ln.split(" | ") for ln in out.splitlines() if ln.startswith("mnist-0to4 |")]
    assert [(ln[1], ln[4], ln[5], ln[6]) for ln in lines] == [
        ("2", "sample", "1", "cholesky"), ("6", "mean", "1.5", "authors"), ("6", "sample", "1", "cholesky")]
    assert "skip n1_mnist-0to4_s0_e6_lr0.01_authors_c4_sh2.pt" in out
    assert mech.main(["--out", str(tmp_path / "empty"), "--sets", "mnist-0to4"]) == 1
