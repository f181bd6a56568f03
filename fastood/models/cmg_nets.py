"""The networks of CMG (Wang et al., ECML 2022) for MNIST as the authors built them (shaoyijia/CMG), for
reproducing their Table 1, Setting 1.

- :class:`CMGEncoder`: the paper's "9-layer CNN encoder" (``models/conv/cnn.py`` ``ConvEncoder``)::

      [B, C, 28, 28] -> Dropout2d(0.2) -> [Conv(C, 64, 3) -> BN -> LReLU] -> [Conv(64, 64, 3) -> BN -> LReLU]
        -> [Conv(64, 128, 3, stride 2) -> BN -> LReLU]                                          -> [B, 128, 14, 14]
        -> Dropout2d(0.2) -> 2 x [Conv(128, 128, 3) -> BN -> LReLU] -> [Conv(128, 128, 3, stride 2) -> BN -> LReLU]
        -> Dropout2d(0.2) -> 2 x [Conv(128, 128, 3) -> BN -> LReLU] -> [Conv(128, 128, 3, stride 2) -> BN -> LReLU]
                                                                                                 -> [B, 128, 4, 4]

  every convolution 3 x 3, padding 1, no bias; LeakyReLU slope 0.2; the authors' initialisation (``weights_init``:
  conv weights N(0, 0.05^2), BN weights N(1, 0.02^2), BN biases 0). The first Dropout2d acts on the input image:
  on a 1-channel image it zeroes the whole image (of 20% of the training images), as in the authors' code.
- :class:`CMGClassifier`: ``MainModel(28, 1, classes, dataset='mnist')``: the encoder, then the authors' ``MLP``
  ``Linear(2048, 512) -> ReLU -> Linear(512, num_outputs)`` (``fc1``, ``fc``). CMG's stage 2 fine-tunes this MLP
  (``fc1`` and ``fc``) with the encoder frozen: ``CMGTrainer(..., train="head")`` finds exactly these layers.
- :class:`CMGCVAE`: ``models/vae.py`` ``ConditionalVAE(dataset='mnist')`` with its ``ConvLayers`` /
  ``DeconvLayers``::

      encoder: x -> Conv(C, 64, 4, stride 2, padding 15) -> ReLU -> Conv(64, 128, 4, stride 2, padding 15) -> ReLU
               -> flatten (128 x 28 x 28 = 100,352) -> Linear(100352, 1024) -> ReLU -> Linear(1024, 32) twice
               (mu, logvar). The encoder does not see the class.
      decoder: [z (32), e_y (32)] -> Linear(64, 1024) -> ReLU -> Linear(1024, 6272) -> 128 x 7 x 7
               -> ConvTranspose(128, 64, 4, stride 2, padding 1) -> ReLU -> ConvTranspose(64, C, 4, stride 2,
               padding 1) -> image

  (the padding 15 keeps the encoder's grid at 28 x 28, so ``Linear(100352, 1024)`` holds 103M of the network's
  110M parameters.) Class embeddings ``e_y`` (32-d, learned) are the authors' ``class_embed = nn.Linear(class_num,
  32)`` applied to one-hot rows, i.e. one free vector per class (``W[:, y] + b``); fastood keeps them as an
  ``nn.Embedding(num_classes, 32)`` initialised as the authors' layer is (``U(-1/sqrt(10), 1/sqrt(10))`` for the
  column plus the bias, the authors' ``class_num`` being 10 for every partition). CMG's pseudo-OOD images mix two
  classes' embeddings element by element (:class:`fastood.samplers.ClassMixSampler`).
  Objective (``train_cvae.py``): per-pixel mean squared error + KL / 784 on images in [0, 1]. On fastood's
  [-1, 1] images the sum of squared errors is 4 x 784 times the authors' per-pixel mean, so ``recon="mse"`` with
  ``kl_weight=4`` is the authors' loss times 3136 (the same minimiser; Adam's steps are invariant to the factor).

Differences that do not change the function class: the authors' images are in [0, 1] with a sigmoid decoder;
fastood's are in [-1, 1] with ``tanh`` (``tanh(a) = 2 sigmoid(2a) - 1``); the authors' classifier has 11 outputs
for 6 ID classes in Setting 1 (output 7 is CMG-softmax's OOD class, 8-11 are never used); here ``num_outputs`` is
the number of ID classes and :class:`~fastood.trainers.CMGTrainer` adds the OOD output at stage 2.
"""
import math

import torch
from torch import nn

from ._checks import positive_int
from .cvae import ConditionalVAE

#: the authors' ``class_num`` of ``class_embed = nn.Linear(class_num, z_dim)`` (10 in every MNIST partition)
AUTHORS_CLASS_NUM = 10


def _conv_block(c_in: int, c_out: int, stride: int):
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]


class CMGEncoder(nn.Sequential):
    """The authors' 9-layer CNN feature extractor: ``[B, C, 28, 28] -> [B, 128, 4, 4]`` (2,048 features).

    See the module docstring for the layers and the initialisation. ``out_features`` = 2048.
    """

    out_features = 128 * 4 * 4

    def __init__(self, in_channels: int = 1):
        positive_int("in_channels", in_channels)
        layers = [nn.Dropout2d(0.2)]
        layers += _conv_block(in_channels, 64, 1) + _conv_block(64, 64, 1) + _conv_block(64, 128, 2)
        layers += [nn.Dropout2d(0.2)]
        layers += _conv_block(128, 128, 1) + _conv_block(128, 128, 1) + _conv_block(128, 128, 2)
        layers += [nn.Dropout2d(0.2)]
        layers += _conv_block(128, 128, 1) + _conv_block(128, 128, 1) + _conv_block(128, 128, 2)
        super().__init__(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The authors' ``weights_init``: conv weights ~ N(0, 0.05^2), BN weights ~ N(1, 0.02^2), BN biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.05)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02)
                m.bias.zero_()


class CMGClassifier(nn.Sequential):
    """The authors' MNIST classifier (``MainModel``): ``[B, C, 28, 28] -> logits [B, num_outputs]``.

    ``encoder`` (:class:`CMGEncoder`) -> ``flatten`` -> ``fc1`` Linear(2048, 512) -> ``relu`` -> ``fc``
    Linear(512, num_outputs). ``fc`` is the last layer (Mahalanobis' penultimate features are its 512-d input);
    ``fc1`` + ``fc`` are the MLP that CMG's stage 2 fine-tunes.
    """

    def __init__(self, num_outputs: int = 6, in_channels: int = 1, hidden: int = 512):
        positive_int("num_outputs", num_outputs)
        positive_int("hidden", hidden)
        super().__init__()
        self.encoder = CMGEncoder(in_channels)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(CMGEncoder.out_features, hidden)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(hidden, num_outputs)


class CMGCVAE(ConditionalVAE):
    """The authors' conditional VAE for 28 x 28 images (see the module docstring): latent 32, learned 32-d class
    embeddings, an encoder that does not see the class.

    Same interface as :class:`ConditionalVAE` (``encode``, ``decode``, ``class_vectors``, ``loss_terms``), which
    :class:`~fastood.trainers.CVAETrainer` and :class:`~fastood.samplers.ClassMixSampler` use; ``encode(x, cond)``
    ignores ``cond``. Loss: ``recon="mse"`` with ``kl_weight=4`` (the authors' objective up to a constant factor).
    """

    def __init__(self, num_classes: int = 6, latent_dim: int = 32, in_channels: int = 1):
        positive_int("num_classes", num_classes)
        positive_int("latent_dim", latent_dim)
        positive_int("in_channels", in_channels)
        super().__init__(in_channels=in_channels, image_size=28, num_classes=num_classes, latent_dim=latent_dim,
                         width=64, hidden=1024, conditioning="embedding", embed_dim=32, output="tanh", recon="mse",
                         kl_weight=4.0)
        self.encoder_conv = nn.Sequential(
            nn.Conv2d(in_channels, 64, 4, stride=2, padding=15), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2, padding=15), nn.ReLU(), nn.Flatten())
        self.encoder_fc = nn.Sequential(nn.Linear(128 * 28 * 28, 1024), nn.ReLU())
        self.decoder_fc = nn.Sequential(nn.Linear(latent_dim + 32, 1024), nn.ReLU(), nn.Linear(1024, 128 * 7 * 7))
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, in_channels, 4, stride=2, padding=1))
        with torch.no_grad():  # the authors' nn.Linear(10, 32) on one-hot rows: weight column + bias
            bound = 1.0 / math.sqrt(AUTHORS_CLASS_NUM)
            column = torch.empty_like(self.embedding.weight).uniform_(-bound, bound)
            bias = torch.empty(1, self.embedding.weight.shape[1]).uniform_(-bound, bound)
            self.embedding.weight.copy_(column + bias)

    def encode(self, x, cond=None):
        """``(mu [B, d], logvar [B, d])`` of ``q(z | x)``: the authors' encoder does not see the class (``cond`` is
        accepted for the :class:`ConditionalVAE` interface and ignored)."""
        x = self._check_images(x)
        h = self.encoder_fc(self.encoder_conv(x))
        return self.fc_mu(h), self.fc_logvar(h)
