"""ConditionalVAE (shapes, conditioning, loss vs hand computation, input checks) and CVAETrainer."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence
from torch.utils.data import DataLoader, TensorDataset

from fastood.models.cvae import ConditionalVAE
from fastood.trainers.cvae import CVAETrainer


def tiny(**kw):
    args = dict(in_channels=1, image_size=28, num_classes=3, latent_dim=4, width=4, hidden=16)
    args.update(kw)
    return ConditionalVAE(**args)


def images(n=6, shape=(1, 28, 28)):
    return torch.rand(n, *shape) * 2 - 1


@pytest.mark.parametrize("conditioning", ["onehot", "embedding"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_shapes_and_conditioning(conditioning, shape):
    cvae = tiny(in_channels=shape[0], image_size=shape[1], conditioning=conditioning,
                embed_dim=5 if conditioning == "embedding" else None)
    x, y = images(6, shape), torch.tensor([0, 1, 2, 0, 1, 2])
    mu, logvar = cvae.encode(x, y)
    assert mu.shape == logvar.shape == (6, 4)
    recon, mu2, _ = cvae(x, y)
    assert recon.shape == x.shape and recon.abs().max() <= 1
    assert torch.equal(mu, mu2)
    z = torch.randn(6, 4)
    vectors = cvae.class_vectors(y)
    assert vectors.shape == (6, cvae.cond_dim) == (6, 3 if conditioning == "onehot" else 5)
    # labels, their conditioning vectors and a Python int all condition the same way
    assert torch.equal(cvae.decode(z, y), cvae.decode(z, vectors))
    assert torch.equal(cvae.decode(z, 2), cvae.decode(z, torch.full((6,), 2)))
    # a mixed vector (CMG) is accepted and changes the output
    zeros, ones = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    mixed = 0.5 * cvae.class_vectors(zeros) + 0.5 * cvae.class_vectors(ones)
    assert not torch.equal(cvae.decode(z, mixed), cvae.decode(z, 0))
    if conditioning == "onehot":
        assert torch.equal(vectors, torch.nn.functional.one_hot(y, 3).float())
    else:
        assert torch.equal(vectors, cvae.embedding.weight[y])


def test_encoder_and_decoder_are_per_sample():
    cvae = tiny()
    x, y = images(5), torch.tensor([0, 1, 2, 1, 0])
    mu, _ = cvae.encode(x, y)
    assert torch.allclose(cvae.encode(x[2:3], y[2:3])[0], mu[2:3], atol=1e-6)
    z = torch.randn(5, 4)
    assert torch.allclose(cvae.decode(z[3:4], y[3:4]), cvae.decode(z, y)[3:4], atol=1e-6)


def _hand_terms(cvae, x, y, seed):
    """The negative ELBO written out by hand with the eps that reparameterize draws after torch.manual_seed(seed)."""
    mu, logvar = cvae.encode(x, y)
    torch.manual_seed(seed)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    out = cvae.decode(z, y).double()
    xd = x.double()
    if cvae.recon == "bce":
        p, t = (out + 1) / 2, (xd + 1) / 2
        recon = -(t * torch.log(p) + (1 - t) * torch.log1p(-p)).flatten(1).sum(1).mean()
    else:
        recon = (out - xd).square().flatten(1).sum(1).mean()
    kl = kl_divergence(Normal(mu.double(), torch.exp(0.5 * logvar.double())), Normal(0.0, 1.0)).sum(1).mean()
    return recon, kl


@pytest.mark.parametrize("recon", ["bce", "mse"])
@pytest.mark.parametrize("kl_weight", [1.0, 0.25])
def test_loss_matches_hand_computation(recon, kl_weight):
    cvae = tiny(recon=recon, kl_weight=kl_weight)
    with torch.no_grad():  # keep the decoder's outputs away from +-1 so the hand-written log(p) stays finite
        cvae.decoder_conv[-1].weight.mul_(0.1)
    x, y = images(4), torch.tensor([0, 2, 1, 1])
    hand_recon, hand_kl = _hand_terms(cvae, x, y, seed=7)
    torch.manual_seed(7)
    # the encoder runs before the draw in both, so the same seed gives the same eps
    terms = cvae.loss_terms(x, y)
    torch.testing.assert_close(terms["recon"].double(), hand_recon, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms["kl"].double(), hand_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["loss"].double(), hand_recon + kl_weight * hand_kl, rtol=1e-4, atol=1e-3)
    torch.manual_seed(7)
    torch.testing.assert_close(cvae.loss(x, y), terms["loss"])


def test_without_latent_noise_the_decoder_sees_the_mean_and_kl_still_counts():
    """latent_noise=False (Vernekar et al.'s notebooks): z = mu in training; the KL term is unchanged."""
    cvae = tiny(latent_noise=False)
    with torch.no_grad():
        cvae.decoder_conv[-1].weight.mul_(0.1)
    x, y = images(4), torch.tensor([0, 2, 1, 1])
    mu, logvar = cvae.encode(x, y)
    recon, mu2, logvar2 = cvae(x, y)
    assert torch.equal(recon, cvae.decode(mu, y)) and torch.equal(mu2, mu) and torch.equal(logvar2, logvar)
    terms = cvae.loss_terms(x, y)
    torch.testing.assert_close(terms, cvae.loss_terms(x, y))  # no draw: the same twice
    out, t = (cvae.decode(mu, y).double() + 1) / 2, (x.double() + 1) / 2
    hand_recon = -(t * torch.log(out) + (1 - t) * torch.log1p(-out)).flatten(1).sum(1).mean()
    torch.testing.assert_close(terms["recon"].double(), hand_recon, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms["kl"].double(), _hand_terms(cvae, x, y, seed=0)[1], rtol=1e-5, atol=1e-5)
    # logvar gets its gradient only from the KL term: with kl_weight 0 it gets none
    cvae0 = tiny(latent_noise=False, kl_weight=0.0)
    cvae0.loss(x, y).backward()
    assert cvae0.fc_logvar.weight.grad is None or not cvae0.fc_logvar.weight.grad.any()
    # the default VAE draws: two calls differ
    vae = tiny()
    assert not torch.equal(vae(x, y)[0], vae(x, y)[0])
    with pytest.raises(TypeError, match="latent_noise must be a bool"):
        tiny(latent_noise="no")


def test_bce_is_exact_where_the_tanh_saturates():
    """BCE is computed from the logits 2a, so a saturated tanh output gives a finite, correct loss."""
    cvae = tiny()
    with torch.no_grad():
        cvae.decoder_conv[-1].bias.fill_(30.0)  # tanh(a) == 1.0 in float32
    x = -torch.ones(2, 1, 28, 28)  # targets 0 where p rounds to 1
    terms = cvae.loss_terms(x, torch.tensor([0, 1]))
    assert torch.isfinite(terms["loss"])
    assert terms["recon"] > 784 * 50  # about 784 * 2a, a ~ 30


def test_input_errors():
    cvae = tiny()
    x = images(2)
    with pytest.raises(ValueError, match="labels must lie in"):
        cvae.encode(x, torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        cvae.class_vectors(torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"conditioning vectors must have shape \[B, cond_dim\] = \[2, 3\]"):
        cvae.decode(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 28, 28\]"):
        cvae.encode(torch.rand(2, 1, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"z must be a latent tensor \[B, 4\]"):
        cvae.decode(torch.randn(2, 3), 0)
    with pytest.raises(ValueError, match="recon='bce' needs images in"):
        cvae.loss(x * 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="recon='bce' needs output='tanh'"):
        ConditionalVAE(output="linear")
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 4"):
        ConditionalVAE(image_size=30)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ConditionalVAE(conditioning="film")
    with pytest.raises(ValueError, match="embed_dim is only used"):
        ConditionalVAE(embed_dim=4)
    assert torch.isfinite(tiny(recon="mse", output="linear").loss(x * 3, torch.tensor([0, 1])))


def _loader(n=48, seed=0):
    """Three classes, each a fixed random template (pixels at +-0.9) plus a little noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.where(torch.rand(3, 1, 28, 28, generator=g) > 0.5, 0.9, -0.9)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (templates[y] + 0.05 * torch.randn(n, 1, 28, 28, generator=g)).clamp(-1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)


def test_trainer_lowers_the_loss():
    torch.manual_seed(0)
    cvae = tiny()
    x, y = next(iter(DataLoader(_loader().dataset, batch_size=48)))
    with torch.no_grad():
        torch.manual_seed(1)
        before = float(cvae.loss(x, y))
    trainer = CVAETrainer(cvae, progress=False, lr=1e-2).fit(_loader(), epochs=4)
    with torch.no_grad():
        torch.manual_seed(1)
        after = float(cvae.loss(x, y))
    assert after < before - 40  # about 548 -> 479
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert {"loss", "recon", "kl", "step"} <= set(trainer.history[-1])
    assert len(trainer.history) == 4 * 6
    with pytest.raises(TypeError, match="has no OOD detector"):
        trainer.detector()


def test_checkpoint_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    reference = tiny()
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.manual_seed(5)  # the reparameterization noise comes from the global generator
    CVAETrainer(reference, progress=False, seed=3).fit(_loader(), steps=9)

    interrupted = tiny()
    interrupted.load_state_dict(start)
    torch.manual_seed(5)
    CVAETrainer(interrupted, progress=False, seed=3, checkpoint_dir=str(tmp_path), checkpoint_every=2).fit(
        _loader(), steps=4)
    resumed_model = tiny()
    resumed_model.load_state_dict(start)
    torch.manual_seed(123)  # overwritten by the checkpoint's RNG state
    resumed = CVAETrainer(resumed_model, progress=False, seed=3, checkpoint_dir=str(tmp_path))
    resumed.fit(_loader(), steps=9)
    assert resumed.step == 9 and len(resumed.history) == 9
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[k], v, rtol=0, atol=0)


def test_trainer_rejects_bad_batches_and_models():
    with pytest.raises(TypeError, match="loss_terms"):
        CVAETrainer(torch.nn.Linear(2, 2))
    trainer = CVAETrainer(tiny(), progress=False)
    with pytest.raises(ValueError, match="labeled batches"):
        trainer.training_step(images(2))
