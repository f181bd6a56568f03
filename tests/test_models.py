import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastood.models import GaussianClassifier, GaussianHead, SmallCNN, TwoHead, resnet18_cifar, split_head


# ----------------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 8)])
def test_small_cnn_shapes(channels, size):
    m = SmallCNN(in_channels=channels, num_classes=7, image_size=size, width=8, feat_dim=16)
    x = torch.randn(4, channels, size, size)
    assert m(x).shape == (4, 7) and m.features(x).shape == (4, 16)
    m.eval()
    torch.testing.assert_close(m.fc(m.features(x)), m(x))
    assert isinstance(m.fc, nn.Linear)


def test_small_cnn_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(image_size=4)
    with pytest.raises(ValueError, match="num_classes"):
        SmallCNN(num_classes=0)
    with pytest.raises(ValueError, match="dropout"):
        SmallCNN(dropout=1.0)


def test_small_cnn_batchnorm_hooks_see_their_own_output():
    m = SmallCNN(width=4, feat_dim=8).eval()
    seen = {}
    m.body[1].register_forward_hook(lambda mod, args, out: seen.setdefault("bn", out))
    m(torch.randn(2, 1, 28, 28))
    assert seen["bn"].min() < 0  # a BatchNorm output, not overwritten by the ReLU after it


def test_resnet18_cifar_shapes():
    m = resnet18_cifar(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10) and m.features(x).shape == (2, 512)
    assert abs(sum(p.numel() for p in m.parameters()) - 11_173_962) < 1000
    gray = resnet18_cifar(num_classes=3, in_channels=1)
    assert gray(torch.randn(1, 1, 28, 28)).shape == (1, 3)


# ----------------------------------------------------------------------------------------------- split_head
class _DenseNetLike(nn.Module):
    """A `features` *module* whose output is not the head's input, and a classifier Sequential ending in Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 4))

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.features(x)), 1), 1))


def _models_and_inputs():
    import torchvision

    return [(torchvision.models.resnet18(weights=None, num_classes=5), torch.randn(2, 3, 32, 32), "fc"),
            (SmallCNN(width=8, num_classes=5), torch.randn(2, 1, 28, 28), "fc"),
            (nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5)), torch.randn(2, 12), "3"),
            (_DenseNetLike(), torch.randn(2, 3, 9, 9), "classifier.1")]


def test_split_head_reproduces_the_model_and_shares_its_modules():
    for model, x, head_path in _models_and_inputs():
        model.eval()
        backbone, head = split_head(model)
        assert head is model.get_submodule(head_path)
        z = backbone(x)
        assert z.shape == (2, head.in_features)
        torch.testing.assert_close(head(z), model(x))
        # The backbone holds every parameter of the model except the head's, as the same tensors.
        model_params = {id(p) for p in model.parameters()}
        backbone_params = {id(p) for p in backbone.parameters()}
        head_params = {id(p) for p in head.parameters()}
        assert backbone_params == model_params - head_params and not (backbone_params & head_params)


def test_split_head_backbone_never_runs_the_head_and_trains_the_model():
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3)
    backbone, head = split_head(model)
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    backbone(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not calls and model.conv1.weight.grad is not None and head.weight.grad is None
    backbone.eval()
    assert not model.training and not model.layer1.training
    backbone.train()
    assert model.training and model.bn1.training
    for p in backbone.parameters():  # freezing the extractor leaves the head trainable
        p.requires_grad_(False)
    assert head.weight.requires_grad


def test_split_head_errors():
    with pytest.raises(TypeError, match="cannot find the final nn.Linear of Conv2d: looked for an attribute fc"):
        split_head(nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match="must end in nn.Linear, got ReLU"):
        split_head(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(TypeError, match="empty Sequential"):
        split_head(nn.Sequential())
    with pytest.raises(TypeError, match="must be an nn.Module"):
        split_head(lambda x: x)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return x

    backbone, _ = split_head(Unused())
    with pytest.raises(RuntimeError, match="never called its head"):
        backbone(torch.randn(1, 3))


# ----------------------------------------------------------------------------------------------- TwoHead
def test_two_head_from_model_shares_backbone_and_first_head():
    model = SmallCNN(width=8, feat_dim=16, num_classes=4).eval()
    two = TwoHead.from_model(model).eval()
    x = torch.randn(3, 1, 28, 28)
    l1, l2 = two(x)
    assert l1.shape == l2.shape == (3, 4)
    torch.testing.assert_close(l1, model(x))
    assert not torch.allclose(l1, l2)
    assert two.head1 is model.fc and two.head2 is not model.fc
    assert two.head2.weight.shape == model.fc.weight.shape and not torch.equal(two.head2.weight, model.fc.weight)
    assert {id(p) for p in two.backbone.parameters()} == {id(p) for p in model.body.parameters()}
    torch.testing.assert_close(two.features(x), model.features(x))
    # One copy of each head in the state dict: the backbone does not hold head1 a second time.
    assert sum(k.endswith("fc.weight") for k in two.state_dict()) == 0 and "head1.weight" in two.state_dict()


def test_two_head_heads_are_independent():
    torch.manual_seed(1)
    fresh = TwoHead(nn.Flatten(), 12, 3)
    assert not torch.equal(fresh.head1.weight, fresh.head2.weight)
    assert not torch.equal(fresh.head1.bias, fresh.head2.bias)
    l1, l2 = fresh(torch.randn(2, 3, 4))
    assert l1.shape == (2, 3) and not torch.allclose(l1, l2)
    with pytest.raises(ValueError, match="feat_dim"):
        TwoHead(nn.Flatten(), 0, 3)


# ----------------------------------------------------------------------------------------------- GaussianHead
def _random_head(feat_dim=4, num_classes=3, seed=0):
    torch.manual_seed(seed)
    head = GaussianHead(feat_dim, num_classes).double()
    with torch.no_grad():
        head.lower.copy_(torch.randn(feat_dim, feat_dim))
        head.log_diag.copy_(torch.randn(feat_dim) * 0.3)
        head.means.copy_(torch.randn(num_classes, feat_dim))
    return head


def test_gaussian_head_matches_explicit_inverse():
    head = _random_head()
    z = torch.randn(5, 4, dtype=torch.float64)
    L = head.scale_tril.detach()
    assert torch.equal(L, torch.tril(L)) and (torch.diagonal(L) > 0).all()
    L_inv = torch.linalg.inv(L)
    want = torch.stack([-((L_inv @ (z - m).T) ** 2).sum(0) for m in head.means.detach()], dim=1)
    torch.testing.assert_close(head(z), want, rtol=1e-10, atol=1e-10)
    # Same as the Mahalanobis form with Sigma = L L^T.
    prec = torch.linalg.inv(head.covariance.detach())
    diff = z[:, None, :] - head.means.detach()[None]
    torch.testing.assert_close(head(z), -torch.einsum("bcf,fg,bcg->bc", diff, prec, diff))
    assert (head(z) <= 0).all()


def test_gaussian_head_after_init_matches_explicit_inverse():
    torch.manual_seed(2)
    feats = torch.randn(200, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
    head = GaussianHead(4, 3).double().init_from_features(feats, torch.arange(200) % 3)
    with torch.no_grad():  # move the trainable factor and means away from their start
        head.lower.add_(0.3 * torch.randn(4, 4, dtype=torch.float64))
        head.log_diag.add_(0.2 * torch.randn(4, dtype=torch.float64))
        head.means.add_(torch.randn(3, 4, dtype=torch.float64))
    L, m = head.scale_tril.detach(), head.class_means.detach()
    assert torch.equal(L, torch.tril(L)) and (torch.diagonal(L) > 0).all()
    z = feats[:7]
    L_inv = torch.linalg.inv(L)
    want = torch.stack([-((L_inv @ (z - mean).T) ** 2).sum(0) for mean in m], dim=1)
    torch.testing.assert_close(head(z), want, rtol=1e-9, atol=1e-9)


def test_gaussian_head_trains_stably_on_badly_scaled_features():
    # Feature scales from 1e-3 to 1, as with near-dead ReLU units: the whitened parametrization keeps SGD at a
    # fine-tuning learning rate stable (with the raw Cholesky factor as parameter it diverges in a few steps).
    torch.manual_seed(0)
    labels = torch.arange(512) % 4
    scales = torch.logspace(-3, 0, 8)
    feats = (torch.randn(512, 8) + 2 * torch.randn(4, 8)[labels]) * scales
    head = GaussianHead(8, 4).init_from_features(feats, labels)
    opt = torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9)
    losses = []
    for step in range(60):
        batch = torch.arange(64) + 64 * (step % 8)
        h, y = head(feats[batch]), labels[batch]
        loss = nn.functional.cross_entropy(h, y) - h.gather(1, y[:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and max(losses) < 2 * losses[0]
    assert sum(losses[-8:]) < sum(losses[:8])


def test_gaussian_head_gradients_match_finite_differences():
    head = _random_head(feat_dim=3, num_classes=2, seed=3)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, m, lo, ld: _functional_head(head, z, m, lo, ld),
                                    (z, head.means, head.lower, head.log_diag))


def _functional_head(head, z, means, lower, log_diag):
    return torch.func.functional_call(head, {"means": means, "lower": lower, "log_diag": log_diag}, (z,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_head_finite_at_the_means(dtype):
    head = _random_head(feat_dim=6, num_classes=3).to(dtype)
    z = head.means.detach().clone().requires_grad_()
    h = head(z)
    torch.testing.assert_close(h.diagonal(), torch.zeros(3, dtype=dtype))
    # ICE's outlier term -log(1 - exp(max h)) is +inf at h = 0 by design; h itself and its gradients stay finite.
    (h.max(1).values.sum() + h.sum()).backward()
    assert torch.isfinite(z.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_gaussian_head_gradient_vanishes_at_its_own_mean():
    head = _random_head(feat_dim=5, num_classes=2).float()
    z = head.means[:1].detach().clone().requires_grad_()
    head(z)[0, 0].backward()
    assert z.grad.abs().max() < 1e-5  # the maximum of h_0


def test_gaussian_head_autocast_runs_in_float32():
    head = GaussianHead(8, 3)
    z = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = head(z.bfloat16())
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, head(z.bfloat16().float()))


def test_gaussian_head_bad_inputs():
    head = GaussianHead(3, 2)
    with pytest.raises(ValueError, match=r"z must have shape \[B, 3\]"):
        head(torch.randn(3, 5))
    with pytest.raises(ValueError, match="classes \\[1\\] have no sample"):
        head.init_from_features(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        head.init_from_features(torch.full((4, 3), float("nan")), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        head.init_from_features(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="features must be a tensor"):
        head.init_from_features(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        GaussianHead(3, 0)


def test_gaussian_head_init_from_features_recovers_means_and_covariance():
    torch.manual_seed(0)
    labels = torch.arange(4000) % 2
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    true_means = torch.tensor([[3.0, 0.0], [-3.0, 1.0]])
    feats = torch.randn(4000, 2) @ torch.linalg.cholesky(cov).T + true_means[labels]
    head = GaussianHead(2, 2).init_from_features(feats, labels, ridge=0.0)
    torch.testing.assert_close(head.class_means.detach(), true_means, atol=0.1, rtol=0)
    torch.testing.assert_close(head.covariance.detach(), cov, atol=0.15, rtol=0)
    # Exactly the sample statistics (float64 reference).
    f64 = feats.double()
    means = torch.stack([f64[labels == c].mean(0) for c in range(2)])
    sample_cov = (f64 - means[labels]).T @ (f64 - means[labels]) / len(f64)
    torch.testing.assert_close(head.class_means.detach().double(), means, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.covariance.detach().double(), sample_cov, rtol=1e-5, atol=1e-5)
    ridged = GaussianHead(2, 2).init_from_features(feats, labels, ridge=0.5)
    extra = ridged.covariance.detach().double() - sample_cov
    torch.testing.assert_close(extra, 0.5 * sample_cov.diagonal().mean() * torch.eye(2, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)


def test_gaussian_classifier_from_model_and_loader():
    torch.manual_seed(0)
    model = SmallCNN(width=4, feat_dim=6, num_classes=3)
    clf = GaussianClassifier.from_model(model)
    assert clf.head.feat_dim == 6 and clf.head.num_classes == 3
    x, y = torch.randn(30, 1, 28, 28), torch.arange(30) % 3
    clf.train().init_from_loader(DataLoader(TensorDataset(x, y), batch_size=8))
    assert clf.backbone.training  # the mode it had
    clf.eval()
    feats = model.eval().features(x).double()
    torch.testing.assert_close(clf.head.class_means.detach().double(),
                               torch.stack([feats[y == c].mean(0) for c in range(3)]), rtol=1e-5, atol=1e-5)
    h = clf(x)
    assert h.shape == (30, 3) and (h <= 0).all()
    with pytest.raises(TypeError, match="GaussianHead"):
        GaussianClassifier(nn.Identity(), nn.Linear(3, 3))
