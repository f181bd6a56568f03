"""``fastood eval`` on image folders infers what it can (issue 21 section 3): channels from the model's first
convolution, mean/std/size from the model file, a warning when the normalization is only assumed, unreadable images
named (and skipped with --skip-bad-images), and the first-batch check on every folder. Tiny models and 8x8 images."""
import json
import os
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

import fastood  # noqa: E402
from fastood import cli  # noqa: E402
from fastood.folder_eval import NormalizationWarning, first_conv, infer_inputs  # noqa: E402
from fastood.model_files import load_model  # noqa: E402

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
COMMON = ["--device", "cpu", "--quiet", "--no-plots"]


def _net(in_channels=1, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def _folder(path, n, seed, size=8, sizes=None):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        s = sizes[i % len(sizes)] if sizes else size
        pixels = (torch.rand(s, s, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(path, f"{i}.png"))
    return str(path)


def _exit(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def _report(out):
    return json.loads((out / "results.json").read_text())


def _eval(tmp_path, model_file, *extra, out="ev", ood=None):
    ood = ood or _folder(tmp_path / "ood", 5, 1)
    argv = ["eval", str(model_file), "--id", _folder(tmp_path / "id", 5, 0), "--ood", ood, *COMMON,
            "--out", str(tmp_path / out), *extra]
    return _exit(argv)


# --------------------------------------------------------------------------------------------------------- channels
def test_channels_come_from_the_models_first_convolution(tmp_path, capsys):
    """The trial: a 1-channel model read RGB folders as 3 channels and died with a conv shape mismatch."""
    torch.save(_net(in_channels=1), tmp_path / "gray.pt")  # no metadata: a plain torch.save(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormalizationWarning)
        assert _eval(tmp_path, tmp_path / "gray.pt", "--mean", "0.5", "--std", "0.5") == 0, capsys.readouterr().err
    report = _report(tmp_path / "ev")
    assert report["channels"] == 1 and report["inputs"]["channels"] == "the model's first convolution (0)"
    assert first_conv(_net(in_channels=3)) == ("0", 3) and first_conv(nn.Linear(3, 2)) == (None, None)


def test_a_forced_channel_count_that_does_not_fit_names_the_folder_and_the_options(tmp_path, capsys):
    torch.save(_net(in_channels=1), tmp_path / "gray.pt")
    assert _eval(tmp_path, tmp_path / "gray.pt", "--channels", "3", "--mean", "0.5", "--std", "0.5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastood: error:")
    assert "--id" in err and "first convolution (0) takes 1 channel" in err and "--channels" in err


def test_the_model_files_image_shape_gives_channels_and_size(tmp_path):
    payload = load_model(fastood.save_model(_net(in_channels=3), tmp_path / "m.pt", image_shape=(1, 6, 6),
                                            data="digits-0to4"))
    inputs = infer_inputs(payload)
    assert (inputs["channels"], inputs["size"]) == (1, 6)
    assert inputs["sources"]["channels"] == "model file (image_shape)"
    assert infer_inputs(payload, channels=3, size=8)["sources"] == {
        "size": "--size", "channels": "--channels",
        "normalization": "fastood's [-1, 1] (the model was trained on digits-0to4)"}


# ---------------------------------------------------------------------------------------------------- normalization
def test_mean_and_std_saved_with_the_model_are_applied(tmp_path, capsys):
    """The trial: save_model(..., mean=, std=) was ignored and the folder was scored in [-1, 1] (AUROC 40.3 vs 52.0)."""
    model = _net(in_channels=3)
    path = fastood.save_model(model, tmp_path / "m.pt", mean=MEAN, std=STD)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalizationWarning)  # the file gives the normalization: no warning
        assert _eval(tmp_path, path, "--detector", "energy") == 0, capsys.readouterr().err
    report = _report(tmp_path / "ev")
    assert report["mean"] == pytest.approx(list(MEAN)) and report["std"] == pytest.approx(list(STD))
    assert report["inputs"]["normalization"] == "model file (mean/std)"
    # the same numbers as the flags give
    torch.save(model, tmp_path / "plain.pt")
    assert _eval(tmp_path, tmp_path / "plain.pt", "--detector", "energy", "--mean", ",".join(map(str, MEAN)),
                 "--std", ",".join(map(str, STD)), out="flags") == 0
    (row,), (flags,) = _report(tmp_path / "ev")["rows"].values(), _report(tmp_path / "flags")["rows"].values()
    assert row["ood"] == flags["ood"]
    # and the loader really normalized with them (pixels in [0, 1] -> below -1 for (0 - 0.49) / 0.25)
    from fastood.folder_eval import folder_loaders

    inputs = infer_inputs(load_model(path))
    id_batches, _ = folder_loaders(str(tmp_path / "id"), [str(tmp_path / "ood")], size=inputs["size"],
                                   channels=inputs["channels"], mean=inputs["mean"], std=inputs["std"])
    assert float(next(iter(id_batches))[0].amin()) < -1.5


def test_save_model_refuses_half_a_normalization(tmp_path):
    with pytest.raises(ValueError, match="both mean and std"):
        fastood.save_model(_net(), tmp_path / "m.pt", mean=MEAN)
    with pytest.raises(ValueError, match="std must be > 0"):
        fastood.save_model(_net(), tmp_path / "m.pt", mean=0.5, std=0.0)


def test_no_normalization_from_flags_or_file_warns(tmp_path, capsys):
    torch.save(_net(in_channels=3), tmp_path / "plain.pt")
    with pytest.warns(NormalizationWarning, match=r"no --mean/--std given .* fastood.save_model\(model, path, mean="):
        assert _eval(tmp_path, tmp_path / "plain.pt") == 0
    assert _report(tmp_path / "ev")["inputs"]["normalization"].startswith("fastood's [-1, 1] (assumed")
    with warnings.catch_warnings():  # flags, or a model trained on a built-in benchmark ([-1, 1]): no warning
        warnings.simplefilter("error", NormalizationWarning)
        assert _eval(tmp_path, tmp_path / "plain.pt", "--mean", "0.5", "--std", "0.5", out="ev2") == 0
        builtin = fastood.save_model(_net(in_channels=3), tmp_path / "builtin.pt", data="digits-0to4")
        assert _eval(tmp_path, builtin, out="ev3") == 0


# ------------------------------------------------------------------------------------------------- unreadable files
def _corrupt(folder):
    bad = os.path.join(folder, "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not an image")
    truncated = os.path.join(folder, "0.png")  # a real PNG cut in half
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    return bad, truncated


def test_a_corrupt_image_stops_the_run_naming_the_file_and_the_flag(tmp_path, capsys):
    """The trial: one corrupt PNG aborted the whole run with PIL's error, and there was no way to skip it."""
    ood = _folder(tmp_path / "ood", 5, 1)
    bad, _ = _corrupt(ood)
    torch.save(_net(in_channels=3), tmp_path / "plain.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormalizationWarning)
        assert _eval(tmp_path, tmp_path / "plain.pt", ood=ood) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastood: error:")
    assert os.path.join(os.path.abspath(ood), "0.png") in err or bad in err
    assert "--skip-bad-images" in err


def test_skip_bad_images_counts_and_names_them_in_the_report(tmp_path, capsys):
    ood = _folder(tmp_path / "ood", 5, 1)
    bad, truncated = _corrupt(ood)
    torch.save(_net(in_channels=3), tmp_path / "plain.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormalizationWarning)
        assert _eval(tmp_path, tmp_path / "plain.pt", "--skip-bad-images", "--batch-size", "2", ood=ood) == 0
    printed = capsys.readouterr().out
    report = _report(tmp_path / "ev")
    skipped = report["skipped_images"]
    assert skipped["count"] == 2 and skipped["id"] == []
    files = sorted([os.path.abspath(bad), os.path.abspath(truncated)])
    assert [item["file"] for item in skipped["ood"]["ood"]] == files
    (row,) = report["rows"].values()
    assert row["num_ood"] == {"ood": 4} and row["num_id"] == 5  # 6 files, 2 unreadable
    assert "skipped 2 unreadable image(s)" in printed and "broken.png" in printed


def test_skip_bad_images_only_applies_to_folders(capsys):
    assert _exit(["eval", "model.pt", "--skip-bad-images", *COMMON]) == 2
    assert "--skip-bad-images apply to image folders" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- first-batch check everywhere
def test_an_ood_folder_of_mixed_sizes_names_the_folder_and_size(tmp_path, capsys):
    """The trial: the ID folder got a helpful check, an OOD folder torch's 'stack expects each tensor...'."""
    ood = _folder(tmp_path / "mixed", 4, 1, sizes=(8, 10))
    torch.save(_net(in_channels=3), tmp_path / "plain.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NormalizationWarning)
        assert _eval(tmp_path, tmp_path / "plain.pt", ood=ood) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--ood {ood}" in err and "8x8, 10x10" in err and "--size N" in err
        assert "stack expects" not in err
        assert _eval(tmp_path, tmp_path / "plain.pt", "--size", "8", ood=ood, out="resized") == 0
