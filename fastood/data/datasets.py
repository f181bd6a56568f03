"""The dataset type every fastood loader yields from: images in [-1, 1] with integer labels."""
import torch
from torch.utils.data import TensorDataset


class ImageDataset(TensorDataset):
    """``(image [C, H, W] float32, label int64)`` pairs. OOD sets use label -1.

    Attributes: ``images`` [N, C, H, W], ``labels`` [N], ``name``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, name: str = ""):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        super().__init__(images.float(), labels.long())
        self.name = name

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def shape(self):
        """The image shape (C, H, W)."""
        return tuple(self.images.shape[1:])

    def __repr__(self):
        return f"ImageDataset({self.name!r}, n={len(self)}, shape={self.shape})"


def seeded_subset(ds: ImageDataset, n, seed: int) -> ImageDataset:
    """``n`` images of ``ds`` drawn without replacement by ``torch.randperm`` seeded with ``seed``, kept in the set's
    order; ``ds`` itself when ``n`` is None or at least ``len(ds)``."""
    if n is None or n >= len(ds):
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
    return ImageDataset(ds.images[keep], ds.labels[keep], name=ds.name)
