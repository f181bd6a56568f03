"""bench/energy_probe.py: the energies it prints are -logsumexp of the saved network's logits, per set."""
import torch

from fastood import save_model
from fastood.models import SmallCNN
from script_loader import load_script


def _module():
    return load_script("bench/energy_probe.py")


def test_energies_are_minus_logsumexp_of_the_logits_and_of_head_one():
    probe = _module()
    torch.manual_seed(0)
    model = SmallCNN(num_classes=5, image_size=8, width=4).eval()
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    assert torch.allclose(probe.energies(model, x), -torch.logsumexp(model(x), dim=1))

    class TwoHeads(torch.nn.Module):
        def forward(self, x):
            return model(x), torch.zeros(x.shape[0], 5)

    assert torch.allclose(probe.energies(TwoHeads(), x), -torch.logsumexp(model(x), dim=1))


def test_prints_every_set_for_each_saved_network(tmp_path, capsys):
    probe = _module()
    torch.manual_seed(0)
    save_model(SmallCNN(num_classes=5, image_size=8, width=4), tmp_path / "s0" / "standard" / "model.pt")
    assert probe.main(["--runs", str(tmp_path), "--methods", "standard", "--data", "digits-0to4", "-n", "16"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("standard | ID test: ") and "blobs (training outliers): " in out[0]
    assert "sphere: " in out[0] and any(line.startswith("sphere: pixel norm median") for line in out)
