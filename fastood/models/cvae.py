"""A small convolutional conditional VAE: the generator of the manifold outliers (Vernekar et al. 2019) and of
CMG's class-mixed pseudo-OOD images (Wang et al., ECML 2022)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

CONDITIONING = ("onehot", "embedding")
OUTPUTS = ("tanh", "linear")
#: CMG authors' class-embedding size (shaoyijia/CMG, models/vae.py: nn.Linear(class_num, z_dim), z_dim = 32)
DEFAULT_EMBED_DIM = 32
RECONSTRUCTION = ("bce", "mse")


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per sample [B] from ``mu``, ``logvar`` [B, d]:
    ``-1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))`` (the ELBO's KL term)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)


class ConditionalVAE(nn.Module):
    """Conditional VAE ``q(z | x, y) = N(mu, diag(exp(logvar)))``, ``p(z) = N(0, I)``, decoder ``g(z, c)``.

    Architecture (``s = image_size / 4``, ``w = width``)::

        encoder: x [B, C, H, W] -> Conv(C, w, 4, stride 2) -> ReLU -> Conv(w, 2w, 4, stride 2) -> ReLU -> flatten
                 -> concat c -> Linear(2w s^2 + cond_dim, hidden) -> ReLU -> Linear(hidden, d) twice (mu, logvar)
        decoder: [z, c] -> Linear(d + cond_dim, hidden) -> ReLU -> Linear(hidden, 2w s^2) -> ReLU
                 -> ConvTranspose(2w, w, 4, stride 2) -> ReLU -> ConvTranspose(w, C, 4, stride 2) -> a
                 -> image ``tanh(a)`` (``output="tanh"``, data in [-1, 1]) or ``a`` (``output="linear"``)

    There is no normalization layer, so encoding and decoding are per-sample functions in train and eval mode
    alike (what the batched forward-mode Jacobian of the manifold sampler relies on).

    The class condition ``c`` [B, cond_dim] is the one-hot vector of the label (``conditioning="onehot"``,
    Vernekar et al.; cond_dim = num_classes) or a learned embedding (``"embedding"``, CMG; cond_dim = embed_dim).
    Every method taking ``cond`` accepts labels (an integer tensor [B] or a Python int) or ready conditioning
    vectors (a float tensor [B, cond_dim]), e.g. CMG's mixes ``k * e_i + (1 - k) * e_j`` of two classes' vectors.

    Args:
        in_channels: image channels C (1 for MNIST, 3 for CIFAR).
        image_size: H = W, a multiple of 4 (28 or 32).
        num_classes: number of classes n.
        latent_dim: d.
        width: channels of the first convolution (the decoder mirrors the encoder).
        hidden: width of the fully connected layers.
        conditioning: ``"onehot"`` or ``"embedding"``.
        embed_dim: size of the learned class embedding (``"embedding"`` only; default 32, as CMG's authors:
            ``class_embed = nn.Linear(class_num, z_dim)`` with ``z_dim = 32`` in shaoyijia/CMG ``models/vae.py``).
            With the old default (num_classes) and 5 classes, 6.4% of CMG's elementwise class mixes (measured;
            2 * 0.5^5 = 6.25% expected: all 5 mask bits from the same class) equalled one class's own embedding;
            at 32, 0%.
        output: ``"tanh"`` (images in [-1, 1]) or ``"linear"``.
        recon: reconstruction term of :meth:`loss`: ``"bce"`` (Bernoulli likelihood of the image rescaled to
            [0, 1], needs ``output="tanh"``) or ``"mse"`` (sum of squared errors).
        kl_weight: weight of the KL term (1 = the ELBO).
        latent_noise: True (a VAE): the decoder sees ``z = mu + exp(logvar / 2) eps`` in training; False: it sees
            ``z = mu`` (the KL term still regularizes mu and logvar, but the reconstruction is that of a
            deterministic autoencoder). False is what Vernekar et al.'s notebooks train (sverneka/OODGen, every
            ``*/cvae_generic_batchwise_mahalanobis.ipynb``: ``sampling`` returns ``z_mean``, the noise line is
            commented out); it changes only :meth:`forward` / the loss, not :meth:`encode` / :meth:`decode`.
    """

    def __init__(self, in_channels=1, image_size=28, num_classes=10, latent_dim=8, width=32, hidden=256,
                 conditioning="onehot", embed_dim=None, output="tanh", recon="bce", kl_weight=1.0,
                 latent_noise=True):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("latent_dim", latent_dim),
                            ("width", width), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4 (28 or 32), got {image_size!r}")
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {conditioning!r}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if recon not in RECONSTRUCTION:
            raise ValueError(f"recon must be one of {RECONSTRUCTION}, got {recon!r}")
        if recon == "bce" and output != "tanh":
            raise ValueError("recon='bce' needs output='tanh' (images in [-1, 1] rescaled to [0, 1]); "
                             f"got output={output!r}: use recon='mse'")
        if not (isinstance(kl_weight, (int, float)) and math.isfinite(kl_weight) and kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        if not isinstance(latent_noise, bool):
            raise TypeError(f"latent_noise must be a bool, got {type(latent_noise).__name__} ({latent_noise!r})")
        if conditioning == "onehot":
            if embed_dim is not None:
                raise ValueError(f"embed_dim is only used with conditioning='embedding', got embed_dim={embed_dim!r}")
            cond_dim = num_classes
            self.embedding = None
        else:
            cond_dim = DEFAULT_EMBED_DIM if embed_dim is None else embed_dim
            if isinstance(cond_dim, bool) or not isinstance(cond_dim, int) or cond_dim < 1:
                raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
            self.embedding = nn.Embedding(num_classes, cond_dim)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.latent_dim, self.cond_dim, self.conditioning = latent_dim, cond_dim, conditioning
        self.output, self.recon, self.kl_weight = output, recon, float(kl_weight)
        self.latent_noise = latent_noise
        s = image_size // 4
        self._grid = (2 * width, s, s)
        flat = 2 * width * s * s
        self.encoder_conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.encoder_fc = nn.Sequential(nn.Linear(flat + cond_dim, hidden), nn.ReLU())
        self.fc_mu = nn.Linear(hidden, latent_dim)
        self.fc_logvar = nn.Linear(hidden, latent_dim)
        self.decoder_fc = nn.Sequential(nn.Linear(latent_dim + cond_dim, hidden), nn.ReLU(),
                                        nn.Linear(hidden, flat), nn.ReLU())
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, in_channels, 4, stride=2, padding=1))

    @property
    def image_shape(self):
        """(C, H, W) of the images this model encodes and decodes."""
        return (self.in_channels, self.image_size, self.image_size)

    # ------------------------------------------------------------------ conditioning
    def class_vectors(self, labels) -> torch.Tensor:
        """Conditioning vectors [B, cond_dim] of integer labels [B] (one-hot rows or embedding rows e_y)."""
        labels = self._check_labels(labels)
        if self.embedding is None:
            dtype = self.fc_mu.weight.dtype
            return F.one_hot(labels, self.num_classes).to(dtype)
        return self.embedding(labels)

    def condition(self, cond, batch: int) -> torch.Tensor:
        """The conditioning vectors [batch, cond_dim] of ``cond``: labels (int tensor [batch] or a Python int for
        the whole batch) or vectors (float tensor [batch, cond_dim], returned as they are)."""
        device = self.fc_mu.weight.device
        if isinstance(cond, bool):
            raise TypeError("cond must be labels (int tensor [B] or an int) or vectors [B, cond_dim], got bool")
        if isinstance(cond, int):
            return self.class_vectors(torch.full((batch,), cond, dtype=torch.long, device=device))
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"cond must be labels (int tensor [B] or an int) or vectors [B, cond_dim], got "
                            f"{type(cond).__name__}")
        if cond.is_floating_point():
            if cond.shape != (batch, self.cond_dim):
                raise ValueError(f"conditioning vectors must have shape [B, cond_dim] = [{batch}, {self.cond_dim}], "
                                 f"got {tuple(cond.shape)}")
            if cond.device != device:
                raise ValueError(f"cond is on {cond.device} but the model is on {device}")
            return cond.to(self.fc_mu.weight.dtype)
        if cond.shape != (batch,):
            raise ValueError(f"labels must have shape [B] = [{batch}], got {tuple(cond.shape)}")
        return self.class_vectors(cond)

    def _check_labels(self, labels) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer tensor, got {got}")
        device = self.fc_mu.weight.device
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but the model is on {device}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return labels.long()

    # ------------------------------------------------------------------ encoder / decoder
    def _check_images(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point image tensor [B, C, H, W], got {got}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.image_shape))}], got {tuple(x.shape)}")
        return x

    def encode(self, x, cond):
        """``(mu [B, d], logvar [B, d])`` of ``q(z | x, c)``; x [B, C, H, W], cond: labels or vectors."""
        x = self._check_images(x)
        h = self.encoder_fc(torch.cat([self.encoder_conv(x), self.condition(cond, x.shape[0])], 1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_preactivation(self, z, cond) -> torch.Tensor:
        """The decoder's output before the final nonlinearity, a [B, C, H, W] (``tanh(a)`` is the image)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a latent tensor [B, {self.latent_dim}], got {got}")
        h = self.decoder_fc(torch.cat([z, self.condition(cond, z.shape[0])], 1))
        return self.decoder_conv(h.reshape((z.shape[0],) + self._grid))

    def decode(self, z, cond) -> torch.Tensor:
        """Images ``g(z, c)`` [B, C, H, W] (in [-1, 1] with ``output="tanh"``); z [B, d], cond: labels or vectors."""
        a = self.decode_preactivation(z, cond)
        return torch.tanh(a) if self.output == "tanh" else a

    def reparameterize(self, mu, logvar) -> torch.Tensor:
        """``z = mu + exp(logvar / 2) * eps``, eps ~ N(0, I) from torch's default generator; [B, d]."""
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x, cond, return_terms: bool = False):
        """``(reconstruction [B, C, H, W], mu [B, d], logvar [B, d])`` with z drawn by :meth:`reparameterize`
        (``z = mu`` when ``latent_noise=False``);
        with ``return_terms=True`` the loss terms of :meth:`loss_terms` instead (a trainer calls it so, through
        its possibly DDP-wrapped model)."""
        mu, logvar = self.encode(x, cond)
        z = self.reparameterize(mu, logvar) if self.latent_noise else mu
        a = self.decode_preactivation(z, cond)
        if return_terms:
            return self._terms(x, a, mu, logvar)
        return (torch.tanh(a) if self.output == "tanh" else a), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, cond, sigma: float = 1.0) -> torch.Tensor:
        """``n`` images ``g(z, c)`` with ``z ~ N(0, sigma^2 I)`` (no gradients); cond: labels or vectors."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        z = sigma * torch.randn(n, self.latent_dim, device=self.fc_mu.weight.device, dtype=self.fc_mu.weight.dtype)
        return self.decode(z, cond)

    # ------------------------------------------------------------------ objective
    def loss_terms(self, x, cond) -> dict:
        """The negative ELBO of a batch and its two terms, each a scalar averaged over the batch:

        - ``recon``: ``recon="bce"``: ``-sum_pixels [t log p + (1 - t) log(1 - p)]`` with ``t = (x + 1) / 2`` and
          ``p = (g(z, c) + 1) / 2 = sigmoid(2 a)`` (computed from the logits 2a, so it is exact and stable);
          ``recon="mse"``: ``sum_pixels (g(z, c) - x)^2``.
        - ``kl``: ``KL(q(z | x, c) || N(0, I)) = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))``.
        - ``loss = recon + kl_weight * kl``.
        """
        return self.forward(x, cond, return_terms=True)

    def _terms(self, x, a, mu, logvar):
        if self.recon == "bce":
            if bool(((x < -1.0 - 1e-5) | (x > 1.0 + 1e-5)).any()):
                raise ValueError("recon='bce' needs images in [-1, 1] (rescaled to [0, 1] as Bernoulli targets), got "
                                 f"values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; use recon='mse'")
            recon = F.binary_cross_entropy_with_logits(2 * a, (x + 1) / 2, reduction="none")
        else:
            out = torch.tanh(a) if self.output == "tanh" else a
            recon = (out - x).square()
        recon = recon.flatten(1).sum(1).mean()
        kl = kl_to_standard_normal(mu, logvar).mean()
        return {"loss": recon + self.kl_weight * kl, "recon": recon, "kl": kl}

    def loss(self, x, cond) -> torch.Tensor:
        """``recon + kl_weight * KL`` (a scalar, mean over the batch): see :meth:`loss_terms`."""
        return self.loss_terms(x, cond)["loss"]
