"""Reference networks and heads.

- :class:`SmallCNN` -- a small CNN for 28x28 / 32x32 images, fast on a CPU.
- :func:`resnet18_cifar` -- the 32x32 ResNet-18 of the FIG and CMG papers.
- :class:`ConditionalVAE` -- the class-conditional VAE of the manifold-outlier and CMG methods.
- :class:`VernekarCNN`, :class:`VernekarCVAE` -- Vernekar et al.'s classifier and CVAE (their Table 1).
- :class:`CMGClassifier`, :class:`CMGEncoder`, :class:`CMGCVAE` -- CMG's MNIST classifier (9-layer CNN encoder + MLP)
  and CVAE (Wang et al., Table 1, Setting 1).
- :func:`split_head` -- ``(backbone, final nn.Linear)`` of a classifier.
- :class:`TwoHead` -- shared backbone with two linear heads (two-head discrepancy).
- :class:`GaussianHead`, :class:`GaussianClassifier` -- ICE's Gaussian head ``h_i(z) = -||L^-1 (z - m_i)||^2``.
"""
from .cmg_nets import CMGCVAE, CMGClassifier, CMGEncoder
from .cvae import ConditionalVAE
from .gaussian_head import GaussianClassifier, GaussianHead
from .heads import TwoHead, split_head
from .paper_nets import VernekarCNN, VernekarCVAE
from .resnet import ResNetCifar, resnet18_cifar
from .small_cnn import SmallCNN

__all__ = ["SmallCNN", "resnet18_cifar", "ResNetCifar", "ConditionalVAE", "split_head", "TwoHead", "GaussianHead",
           "GaussianClassifier", "VernekarCNN", "VernekarCVAE"]
__all__ += ["CMGClassifier", "CMGEncoder", "CMGCVAE"]
