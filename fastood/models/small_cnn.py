"""A small convolutional classifier for 28x28 (MNIST-like) and 32x32 images, fast on a CPU."""
import torch
from torch import nn

from ._checks import positive_int


class SmallCNN(nn.Module):
    """Conv(width)-BN-ReLU-MaxPool, Conv(2 width)-BN-ReLU-MaxPool, Conv(4 width)-BN-ReLU-GlobalAvgPool,
    Linear(feat_dim)-ReLU-Dropout, then the classifier ``fc`` (3x3 convolutions, padding 1).

    With the defaults (width 32, 110k parameters) a 28x28 image costs about 7.5M multiply-adds, so training on
    a laptop CPU takes seconds per epoch of mnist5k; ``width=8`` is 16x cheaper for tests.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR).
        num_classes: outputs of the final linear layer ``fc``.
        image_size: 28 or 32 (any size >= 8 works: the last block pools globally).
        width: channels of the first block.
        feat_dim: size of the penultimate features (``features(x)``).
        dropout: dropout before ``fc``.
    Input [B, in_channels, H, W] in [-1, 1]; output logits [B, num_classes].
    """

    def __init__(self, in_channels=1, num_classes=10, image_size=28, width=32, feat_dim=128, dropout=0.0):
        super().__init__()
        in_channels, num_classes = positive_int("in_channels", in_channels), positive_int("num_classes", num_classes)
        width, feat_dim = positive_int("width", width), positive_int("feat_dim", feat_dim)
        image_size = positive_int("image_size (28 for MNIST, 32 for CIFAR)", image_size, minimum=8)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.image_size, self.feat_dim = in_channels, image_size, feat_dim

        def block(cin, cout):
            # ReLU not in place: a forward hook on the BatchNorm (e.g. a Mahalanobis layer) keeps seeing its output.
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feat_dim), nn.ReLU(), nn.Dropout(dropout),
        )
        self.fc = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feat_dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))
