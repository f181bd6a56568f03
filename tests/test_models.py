import pytest
import torch
from torch import nn

from fastood.models import GaussianHead, SmallCNN, TwoHead, resnet18_cifar, split_head


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_small_cnn_shapes(channels, size):
    m = SmallCNN(in_channels=channels, num_classes=7, image_size=size, width=8, feat_dim=16)
    x = torch.randn(4, channels, size, size)
    assert m(x).shape == (4, 7) and m.features(x).shape == (4, 16)


def test_resnet18_cifar_shapes():
    m = resnet18_cifar(num_classes=10)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in m.parameters()) > 11_000_000


def test_split_head_variants():
    import torchvision

    for model in (torchvision.models.resnet18(weights=None, num_classes=5), SmallCNN(width=8, num_classes=5),
                  nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5))):
        backbone, head = split_head(model)
        x = torch.randn(2, 3, 32, 32) if isinstance(model, torchvision.models.ResNet) else \
            (torch.randn(2, 1, 28, 28) if isinstance(model, SmallCNN) else torch.randn(2, 12))
        model.eval()
        torch.testing.assert_close(head(backbone(x)), model(x))
        assert head is (model.fc if hasattr(model, "fc") else model[-1])
    with pytest.raises(TypeError, match="final nn.Linear"):
        split_head(nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="must end in nn.Linear"):
        split_head(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_two_head():
    model = SmallCNN(width=8, feat_dim=16, num_classes=4).eval()
    two = TwoHead.from_model(model).eval()
    x = torch.randn(3, 1, 28, 28)
    l1, l2 = two(x)
    torch.testing.assert_close(l1, model(x))
    assert not torch.allclose(l1, l2)
    assert two.head1 is model.fc and two.head2 is not model.fc
    fresh = TwoHead(nn.Flatten(), 12, 3)
    assert not torch.equal(fresh.head1.weight, fresh.head2.weight)


def test_gaussian_head_matches_explicit_inverse():
    torch.manual_seed(0)
    head = GaussianHead(4, 3).double()
    with torch.no_grad():
        head.lower.copy_(torch.randn(4, 4))
        head.log_diag.copy_(torch.randn(4) * 0.3)
    z = torch.randn(5, 4, dtype=torch.float64)
    L_inv = torch.linalg.inv(head.scale_tril)
    want = torch.stack([-((L_inv @ (z - m).T) ** 2).sum(0) for m in head.means], dim=1)
    torch.testing.assert_close(head(z), want)
    assert (torch.diagonal(head.scale_tril) > 0).all()


def test_gaussian_head_finite_at_the_means():
    head = GaussianHead(3, 2)
    z = head.means.detach().clone().requires_grad_()
    h = head(z)
    assert torch.allclose(h.diagonal(), torch.zeros(2))
    h.max(1).values.sum().backward()
    assert torch.isfinite(z.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_gaussian_head_init_from_features():
    torch.manual_seed(0)
    labels = torch.arange(3000) % 2
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    feats = torch.randn(3000, 2) @ torch.linalg.cholesky(cov).T + torch.tensor([[3.0, 0.0], [-3.0, 1.0]])[labels]
    head = GaussianHead(2, 2).init_from_features(feats, labels)
    torch.testing.assert_close(head.means.data, torch.tensor([[3.0, 0.0], [-3.0, 1.0]]), atol=0.1, rtol=0)
    L = head.scale_tril.detach()
    torch.testing.assert_close(L @ L.T, cov, atol=0.15, rtol=0)
    with pytest.raises(ValueError, match="z must have shape"):
        head(torch.randn(3, 5))
