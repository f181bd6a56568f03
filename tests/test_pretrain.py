import torch
from torch.utils.data import DataLoader

from fastood.data import benchmark
from fastood.metrics import accuracy
from fastood.pretrain import pretrained_small_cnn


def test_standard_training_reaches_97_percent_and_is_cached(tmp_path):
    model = pretrained_small_cnn(epochs=4, cache=str(tmp_path), progress=False)
    bench = benchmark("mnist5k-0to4")
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in DataLoader(bench.id_test, batch_size=256)])
    assert accuracy(logits, bench.id_test.labels) >= 0.97
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name == "smallcnn-mnist5k-0to4-w32-e4-b64-s0.pt"
    again = pretrained_small_cnn(epochs=4, cache=str(tmp_path), progress=False)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
