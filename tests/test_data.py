import pytest
import torch

from fastood.data import auxiliary_outliers, benchmark, image_folder, load, noise, torchvision_dataset


def test_split_is_deterministic_stratified_and_disjoint():
    a, b = load("digits", "train", seed=3), load("digits", "train", seed=3)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, load("digits", "train", seed=4).images)
    test = load("digits", "test", seed=3)
    assert len(a) + len(test) == len(load("digits", "all"))
    train_rows = {tuple(r.tolist()) for r in a.images.flatten(1)}
    overlap = sum(tuple(r.tolist()) in train_rows for r in test.images.flatten(1))
    assert overlap <= 2  # scikit-learn's digits hold a few exact duplicates
    counts = torch.bincount(test.labels)
    assert counts.min() >= 0.8 * counts.max()


def test_classes_filter_remaps_labels_in_given_order():
    ds = load("digits", "all", classes=[7, 2])
    full = load("digits", "all")
    assert set(ds.labels.tolist()) == {0, 1}
    assert (ds.labels == 0).sum() == (full.labels == 7).sum()
    with pytest.raises(ValueError, match="classes"):
        load("digits", classes=[11])


def test_range_shape_and_resize():
    ds = load("digits", "train", size=28)
    assert ds.shape == (1, 28, 28) and ds.images.min() >= -1 and ds.images.max() <= 1
    m = load("mnist5k", "test", classes=range(5))
    assert m.shape == (1, 28, 28) and m.images.min() == -1 and m.images.max() == 1
    assert set(m.labels.tolist()) == set(range(5))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="mnist5k, digits"):
        load("cifar")
    with pytest.raises(ValueError, match="mnist5k-0to4"):
        benchmark("nope")
    with pytest.raises(ValueError, match="gaussian"):
        noise("pink", 3, (1, 4, 4))
    with pytest.raises(ValueError, match="split"):
        load("digits", "val")


def test_noise_sets():
    for kind in ("gaussian", "uniform", "blobs"):
        ds = noise(kind, 16, (3, 8, 8), seed=1)
        assert ds.images.shape == (16, 3, 8, 8) and ds.images.min() >= -1 and ds.images.max() <= 1
        assert (ds.labels == -1).all()
        assert torch.equal(ds.images, noise(kind, 16, (3, 8, 8), seed=1).images)
    sphere = noise("sphere", 10, (1, 5, 5), radius=7.0)
    torch.testing.assert_close(sphere.images.flatten(1).norm(dim=1), torch.full((10,), 7.0))
    with pytest.raises(ValueError, match="radius"):
        noise("sphere", 3, (1, 4, 4))


def test_benchmark_contents():
    b = benchmark("mnist5k-0to4")
    assert b.num_classes == 5 and b.shape == (1, 28, 28)
    assert set(b.ood) == {"mnist5k-5to9", "digits", "gaussian", "uniform", "sphere"}
    for ds in b.ood.values():
        assert ds.shape == (1, 28, 28) and (ds.labels == -1).all()
    radius = b.id_train.images.flatten(1).norm(dim=1).max()
    torch.testing.assert_close(b.ood["sphere"].images.flatten(1).norm(dim=1).max(), radius)
    d = benchmark("digits-0to4")
    assert d.shape == (1, 8, 8) and "digits-5to9" in d.ood


def test_auxiliary_outliers_are_disjoint_from_test_sets():
    b = benchmark("mnist5k-0to4")
    aux = auxiliary_outliers("mnist5k-train-5to9")
    test_rows = {tuple(r.tolist()) for r in b.ood["mnist5k-5to9"].images.flatten(1)}
    assert not any(tuple(r.tolist()) in test_rows for r in aux.images.flatten(1))
    blobs = auxiliary_outliers("blobs", n=8, shape=(1, 28, 28))
    assert blobs.images.shape == (8, 1, 28, 28)
    with pytest.raises(ValueError, match="blobs"):
        auxiliary_outliers("imagenet")


def test_torchvision_adapters_explain_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        torchvision_dataset("cifar10", str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        torchvision_dataset("mnist", str(tmp_path), download=False)
    with pytest.raises(ValueError, match="cifar100"):
        torchvision_dataset("imagenet", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(str(tmp_path / "lsun"), variant="crop")


def test_image_folder_resize_and_crop(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "x").mkdir(parents=True)
    Image.new("RGB", (40, 36), (255, 0, 0)).save(tmp_path / "imgs" / "x" / "a.png")
    for variant in ("resize", "crop"):
        x, _ = image_folder(str(tmp_path / "imgs"), size=32, variant=variant)[0]
        assert x.shape == (3, 32, 32) and x.max() <= 1 and x.min() >= -1
