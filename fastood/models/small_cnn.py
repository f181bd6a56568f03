"""A small convolutional classifier for 28x28 (MNIST-like) and 32x32 images, fast on a CPU."""
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv(width)-BN-ReLU-Pool, Conv(2 width)-BN-ReLU-Pool, Conv(4 width)-BN-ReLU-GlobalPool, Linear(feat_dim), fc.

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
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.in_channels, self.image_size, self.feat_dim = in_channels, image_size, feat_dim

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, feat_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
        )
        self.fc = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feat_dim]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))
