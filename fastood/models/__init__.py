"""Reference networks and heads: resnet18_cifar, SmallCNN, ConditionalVAE, TwoHead, GaussianHead, split_head."""
from .gaussian_head import GaussianClassifier, GaussianHead
from .heads import TwoHead, split_head
from .resnet import resnet18_cifar
from .small_cnn import SmallCNN

__all__ = ["SmallCNN", "resnet18_cifar", "split_head", "TwoHead", "GaussianHead", "GaussianClassifier"]
