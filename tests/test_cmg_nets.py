"""CMG's MNIST networks (fastood.models.cmg_nets) against the authors' code (shaoyijia/CMG)."""
import math

import pytest
import torch
from torch import nn

from fastood.models import CMGClassifier, CMGCVAE, CMGEncoder, ConditionalVAE


def authors_classifier_parameters(classes):
    """Parameter count of the authors' MainModel(28, 1, classes, dataset='mnist'), layer by layer."""
    convs = [(1, 64), (64, 64), (64, 128)] + [(128, 128)] * 6          # 3x3, bias=False
    bns = [64, 64] + [128] * 7                                          # weight + bias
    mlp = (2048 * 512 + 512) + (512 * classes + classes)                # MLP(2048, classes, latent_dim=512)
    return sum(a * b * 9 for a, b in convs) + sum(2 * c for c in bns) + mlp


def authors_cvae_parameters(class_num=10, z=32):
    """Parameter count of the authors' ConditionalVAE(z_dim=32, dataset='mnist'), layer by layer."""
    return ((1 * 64 * 16 + 64) + (64 * 128 * 16 + 128)                  # ConvLayers (4x4, bias)
            + (128 * 28 * 28 * 1024 + 1024)                              # fcE
            + 2 * (1024 * z + z)                                         # fcE_mean, fcE_logvar
            + (2 * z * 1024 + 1024) + (1024 * 7 * 7 * 128 + 7 * 7 * 128)  # fromZ, fcD
            + (128 * 64 * 16 + 64) + (64 * 1 * 16 + 1)                   # DeconvLayers
            + (class_num * z + z))                                       # class_embed = Linear(class_num, z)


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_classifier_shapes_and_parameter_count():
    model = CMGClassifier(6).eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model.encoder(x).shape == (3, 128, 4, 4)
    assert model(x).shape == (3, 6)
    # the authors' model has 11 outputs in Setting 1; with as many outputs the count is theirs exactly
    assert count(CMGClassifier(11)) == authors_classifier_parameters(11) == 2_052_683
    assert count(model) == authors_classifier_parameters(6)
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1, 2, 1, 1, 2]
    assert sum(isinstance(m, nn.Dropout2d) for m in model.encoder) == 3
    assert all(m.negative_slope == 0.2 for m in model.encoder if isinstance(m, nn.LeakyReLU))


def test_classifier_initialisation_is_the_authors():
    torch.manual_seed(1)
    enc = CMGEncoder()
    big = torch.cat([m.weight.detach().flatten() for m in enc if isinstance(m, nn.Conv2d)][1:])
    assert abs(float(big.std()) - 0.05) < 0.002 and abs(float(big.mean())) < 0.002
    bn = torch.cat([m.weight.detach() for m in enc if isinstance(m, nn.BatchNorm2d)])
    assert abs(float(bn.mean()) - 1.0) < 0.005 and 0.015 < float(bn.std()) < 0.025
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in enc if isinstance(m, nn.BatchNorm2d))


def test_first_dropout_drops_whole_images_in_training():
    """Dropout2d on the 1-channel input zeroes whole images, as in the authors' ConvEncoder."""
    torch.manual_seed(0)
    enc = CMGEncoder().train()
    x = torch.rand(400, 1, 28, 28) + 0.5
    dropped = enc[0](x).flatten(1).abs().sum(1) == 0
    assert 0.1 < float(dropped.float().mean()) < 0.3


def test_stage2_head_is_the_authors_mlp():
    """CMGTrainer(train='head') fine-tunes fc1 and fc (the authors' `classifier` MLP) and freezes the encoder."""
    from fastood.trainers.cmg import CMGTrainer

    model = CMGClassifier(6)
    cvae = ConditionalVAE(num_classes=6, conditioning="embedding", latent_dim=4, width=4, hidden=8)
    trainer = CMGTrainer(model, cvae, mode="energy", train="head")
    trained = {id(p) for p in trainer.trainable_parameters()}
    assert trained == {id(p) for m in (model.fc1, model.fc) for p in m.parameters()}
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_cvae_shapes_and_parameter_count():
    cvae = CMGCVAE(6)
    # the authors' class embedding is Linear(10, 32) (352 parameters); fastood keeps one 32-d vector per class
    assert count(cvae) == authors_cvae_parameters() - (10 * 32 + 32) + 6 * 32 == 109_587_073
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    assert cvae.encoder_conv(x).shape == (2, 128 * 28 * 28)   # padding 15 keeps the 28 x 28 grid
    mu, logvar = cvae.encode(x, torch.tensor([0, 1]))
    assert mu.shape == logvar.shape == (2, 32)
    # the encoder does not see the class
    mu2, _ = cvae.encode(x, torch.tensor([5, 3]))
    assert torch.equal(mu, mu2)
    with torch.no_grad():
        img = cvae.decode(torch.randn(2, 32), torch.tensor([0, 5]))
    assert img.shape == (2, 1, 28, 28) and float(img.abs().max()) <= 1.0
    assert cvae.class_vectors(torch.arange(6)).shape == (6, 32)
    bound = 2 / math.sqrt(10)  # column + bias, each U(-1/sqrt(10), 1/sqrt(10))
    assert float(cvae.embedding.weight.detach().abs().max()) <= bound


def test_cvae_loss_is_the_authors_up_to_a_constant():
    """recon='mse', kl_weight=4 on [-1, 1] images = 3136 x (per-pixel MSE + KL / 784) on [0, 1] images."""
    torch.manual_seed(0)
    cvae = CMGCVAE(6)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cvae.fc_mu.bias.fill_(1.0)  # a KL term of ~16 nats: a wrong KL weight shows (at init it is ~0.01)
        torch.manual_seed(5)
        ours = cvae.loss_terms(x, y)["loss"]
        torch.manual_seed(5)
        mu, logvar = cvae.encode(x, y)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon01 = (cvae.decode(z, y) + 1) / 2
    x01 = (x + 1) / 2
    kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean() / 784
    authors = ((x01 - recon01) ** 2).flatten(1).mean(1).mean() + kl
    assert float(kl) * 784 > 10
    assert float(ours) == pytest.approx(3136 * float(authors), rel=1e-5)
