"""The networks of Vernekar et al. (2019) as the authors built them (sverneka/OODGen, Keras notebooks
``*/cvae_generic_batchwise_mahalanobis.ipynb``), for reproducing their Table 1.

- :class:`VernekarCNN`: the classifier (Keras' MNIST CNN, ``get_model``):
  Conv(1, 32, 3) -> ReLU -> Conv(32, 64, 3) -> ReLU -> MaxPool 2 -> Dropout 0.25 -> Flatten -> Linear(9216, 128)
  -> ReLU -> Dropout 0.5 -> Linear(128, n_outputs). Logits out (the authors' final softmax is in the loss here).
- :class:`VernekarCVAE`: the conditional VAE: encoder Conv(1, 32, 3, stride 2) -> ReLU -> Conv(32, 64, 3, stride
  2) -> ReLU -> Flatten -> concat one-hot -> Linear(3136 + n, 16) -> ReLU -> mu, logvar; decoder
  [z, one-hot] -> Linear(d + n, 3136) -> ReLU -> 64 x 7 x 7 -> ConvTranspose(64, 64, 3, stride 2) -> ReLU ->
  ConvTranspose(64, 32, 3, stride 2) -> ReLU -> ConvTranspose(32, 1, 3) -> image. (The notebook's decoder
  also builds a ``Dense(16)`` on the latent input, but its output is overwritten by the next line: it is not in
  the graph, so it is not here.) Latent size 8 for MNIST, 10 for Fashion-MNIST. Trained as the notebooks train it:
  the decoder sees the mean encoding (their ``sampling`` returns ``z_mean``; the noise line is commented out), the
  loss is still BCE + KL (``latent_noise=False``, see :class:`~fastood.models.ConditionalVAE`).

Differences that do not change the function class: the authors' images are in [0, 1] with a sigmoid output and
Keras 'same' padding; fastood's are in [-1, 1] with ``tanh`` (``tanh(a) = 2 sigmoid(2a) - 1``, the same
Bernoulli likelihood, see :meth:`ConditionalVAE.loss_terms`) and symmetric padding (the 14 x 14 and 7 x 7 grids
are the same).
"""
from torch import nn

from ._checks import positive_int
from .cvae import ConditionalVAE


class VernekarCNN(nn.Sequential):
    """The authors' classifier for 28 x 28 grey images: ``[B, 1, 28, 28] -> logits [B, num_outputs]``.

    For the (n+1)-class classifier pass ``num_outputs = n + 1``. ``features`` is the 128-d penultimate layer
    (after ReLU), ``fc`` the last Linear (what Mahalanobis, ReAct and the head-splitting helpers find).
    """

    def __init__(self, num_outputs: int = 10, in_channels: int = 1):
        positive_int("num_outputs", num_outputs)
        positive_int("in_channels", in_channels)
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop1 = nn.Dropout(0.25)
        self.flatten = nn.Flatten()
        self.dense = nn.Linear(64 * 12 * 12, 128)
        self.features = nn.ReLU()
        self.drop2 = nn.Dropout(0.5)
        self.fc = nn.Linear(128, num_outputs)


class VernekarCVAE(ConditionalVAE):
    """The authors' conditional VAE (one-hot conditioning) on 28 x 28 grey images; see the module docstring.

    Same interface as :class:`ConditionalVAE` (``encode``, ``decode``, ``loss``, ...), which the manifold sampler
    and :class:`~fastood.trainers.CVAETrainer` use. ``latent_noise=False`` (default): the authors' training, the
    decoder fed the mean encoding; True: a VAE's reparameterized sample (fastood's reproduction before this was
    found; ``bench/reproduce_vernekar.py --cvae-latent sample``).
    """

    def __init__(self, num_classes: int = 10, latent_dim: int = 8, in_channels: int = 1, latent_noise: bool = False):
        super().__init__(in_channels=in_channels, image_size=28, num_classes=num_classes, latent_dim=latent_dim,
                         width=32, hidden=16, conditioning="onehot", output="tanh", recon="bce",
                         latent_noise=latent_noise)
        self.encoder_conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.decoder_fc = nn.Sequential(nn.Linear(latent_dim + num_classes, 64 * 7 * 7), nn.ReLU())
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(32, in_channels, 3, padding=1))
