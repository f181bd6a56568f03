"""torchvision adapters for data on disk: MNIST, FashionMNIST, CIFAR-10/100, SVHN, and ODIN-style image folders."""
import os

VISION = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn")
_HOW = ("pass download=True to fetch it, or place the dataset's files under {root} "
        "(the layout torchvision.datasets.{cls} expects)")


def _transforms(size=None, crop=False, gray=False):
    from torchvision import transforms as T

    steps = []
    if size is not None:
        steps.append(T.CenterCrop(size) if crop else T.Resize((size, size)))
    if gray:
        steps.append(T.Grayscale())
    steps += [T.ToTensor(), T.Normalize([0.5] * (1 if gray else 3), [0.5] * (1 if gray else 3))]  # -> [-1, 1]
    return T.Compose(steps)


def torchvision_dataset(name: str, root: str, train: bool = True, download: bool = False):
    """A torchvision dataset with images mapped to [-1, 1]. Missing files raise FileNotFoundError saying where."""
    try:
        import torchvision.datasets as D
    except ImportError:
        raise ImportError("torchvision adapters need torchvision: pip install 'fastood[vision]'") from None
    key = name.lower().replace("-", "").replace("_", "")
    classes = {"mnist": D.MNIST, "fashionmnist": D.FashionMNIST, "cifar10": D.CIFAR10, "cifar100": D.CIFAR100,
               "svhn": D.SVHN}
    if key not in classes:
        raise ValueError(f"unknown torchvision dataset {name!r}; valid names: {', '.join(VISION)}")
    cls = classes[key]
    gray = key in ("mnist", "fashionmnist")
    try:
        if key == "svhn":
            return cls(root, split="train" if train else "test", transform=_transforms(gray=False), download=download)
        return cls(root, train=train, transform=_transforms(gray=gray), download=download)
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "download" in str(exc).lower():
            raise FileNotFoundError(f"{cls.__name__} not found under {os.path.abspath(root)!r}: "
                                    + _HOW.format(root=os.path.abspath(root), cls=cls.__name__)) from exc
        raise


def image_folder(root: str, size: int = 32, variant: str = "resize"):
    """An OOD image folder (e.g. TinyImageNet / LSUN as in ODIN): ``variant="resize"`` (r) or ``"crop"`` (c)
    to ``size x size``, labels ignored. Missing folders raise FileNotFoundError."""
    if variant not in ("resize", "crop"):
        raise ValueError(f"variant must be 'resize' or 'crop', got {variant!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {os.path.abspath(root)!r} does not exist: download and unpack the "
                                "OOD set there (one sub-folder of images, as torchvision.datasets.ImageFolder expects)")
    from torchvision.datasets import ImageFolder

    return ImageFolder(root, transform=_transforms(size=size, crop=variant == "crop"))
