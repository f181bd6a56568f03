"""Toy image data shared by the trainer tests."""
import torch


def stripes(n=40, seed=0):
    """Three easy classes of 1x28x28 images in [-1, 1]: horizontal stripes, vertical stripes, a checkerboard
    (period 4 px), plus a little noise. Returns (x [n, 1, 28, 28], y [n]) with y = 0, 1, 2, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(28)
    rows, cols = ((i // 2) % 2).view(28, 1).expand(28, 28), ((i // 2) % 2).view(1, 28).expand(28, 28)
    templates = torch.stack([rows, cols, rows ^ cols]).float().unsqueeze(1) * 1.8 - 0.9
    y = torch.arange(n) % 3
    return (templates[y] + 0.05 * torch.randn(n, 1, 28, 28, generator=g)).clamp(-1, 1), y
