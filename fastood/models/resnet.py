"""ResNet-18 for 32x32 inputs (CIFAR), as used by the FIG and CMG papers: 3x3 stem, no max-pool."""
import torch
import torch.nn.functional as F
from torch import nn

from ._checks import positive_int


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut (1x1 conv-BN when the shape changes), ReLU after the sum."""

    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet with BasicBlocks for small images: 3x3 stem (stride 1, no max-pool), four stages of widths
    64/128/256/512 (stride 2 from the second on), global average pool, ``fc``. ``features(x)`` -> [B, 512]."""

    def __init__(self, blocks=(2, 2, 2, 2), num_classes=10, in_channels=3):
        super().__init__()
        num_classes, in_channels = positive_int("num_classes", num_classes), positive_int("in_channels", in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for i, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(n):
                stage.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)
        self.feat_dim = 512

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, 512] of images [B, in_channels, H, W] (32x32 for CIFAR)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNetCifar:
    """The 32x32 ResNet-18 of the FIG and CMG papers (BasicBlocks [2, 2, 2, 2], widths 64-512, 11.2M parameters).

    Input [B, in_channels, 32, 32] in [-1, 1] -> logits [B, num_classes]; ``fc`` is the final linear layer.
    """
    return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
