"""The fastood command: help, errors that list the valid choices, bench plumbing, train -> eval -> resume."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastood import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_code(argv):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code


def test_help_explains_every_command_and_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no line wrapping inside hyphenated names
    assert _exit_code(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("demo", "train", "eval", "bench"):
        assert command in text
    for command in ("demo", "train"):
        assert _exit_code([command, "--help"]) == 0
        text = capsys.readouterr().out
        for option in ("--data", "--model", "--epochs", "--steps", "--device", "--seed", "--out", "--resume",
                       "--quiet", "--cache", "--tiny"):
            assert option in text, (command, option)
    assert _exit_code(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(m in text for m in cli.METHODS)


def test_help_imports_nothing_heavy():
    code = ("import sys, contextlib, io\n"
            "from fastood import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        cli.main(['train', '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, kind, valid", [
    (["train", "nonsense"], "method", cli.METHODS),
    (["train", "fig", "--data", "imagenet"], "data set", cli.DATA),
    (["demo", "--data", "imagenet"], "data set", cli.DATA),
    (["demo", "--model", "vgg"], "model", cli.MODELS),
    (["eval", "m.pt", "--detector", "nonsense"], "detector", cli.DETECTORS),
    (["bench", "gemm"], "benchmark", cli.BENCHES),
])
def test_unknown_choices_list_the_valid_ones(capsys, argv, kind, valid):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert f"unknown {kind}" in err
    assert all(v in err for v in valid), err


def test_demo_methods_list_is_checked(capsys):
    assert _exit_code(["demo", "--methods", "fig,bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err and "valid methods: all, fig, gs" in err
    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--methods", "all"]).methods == [m for m in cli.METHODS if m != "standard"]
    assert parser.parse_args(["demo", "--methods", "oe, ice"]).methods == ["oe", "ice"]
    assert parser.parse_args(["demo"]).methods == ["fig"]


def test_bad_numbers_and_exclusive_budget(capsys):
    assert _exit_code(["train", "fig", "--epochs", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert _exit_code(["train", "fig", "--epochs", "2", "--steps", "5"]) == 2
    assert "not allowed with" in capsys.readouterr().err
    assert _exit_code(["train", "fig", "--device", "tpu"]) == 2
    assert "valid devices: auto, cpu, cuda" in capsys.readouterr().err


def test_cli_choices_match_the_package():
    from fastood import data, demo, detectors

    assert cli.METHODS == tuple(demo.METHODS)
    assert cli.DATA == tuple(data.BENCHMARKS)
    # auto (the model's own) and all (every detector), then the registry's names, each once; order-free so that a
    # newly registered detector only has to be added to both lists.
    assert cli.DETECTORS[:2] == ("auto", "all")
    assert sorted(cli.DETECTORS[2:]) == sorted(detectors.DETECTORS)


def test_bench_without_source_tree_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "bench_dir", lambda: str(tmp_path / "bench"))
    assert _exit_code(["bench", "sampler"]) == 2
    err = capsys.readouterr().err
    assert "bench_sampler.py" in err and "source tree" in err


def test_bench_runs_the_script_with_device_json_and_extra_args(tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    bench.mkdir()
    record = tmp_path / "argv.json"
    (bench / "bench_nullspace.py").write_text(
        f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "bench_dir", lambda: str(bench))
    status = cli.main(["bench", "nullspace", "--device", "cpu", "--out", str(tmp_path / "o"), "--", "--quick"])
    assert status == 3  # the script's exit status is passed through
    assert json.loads(record.read_text()) == ["--device", "cpu", "--json", str(tmp_path / "o" / "bench_nullspace.json"),
                                              "--quick"]


def test_bench_dir_points_at_this_checkout():
    assert os.path.samefile(cli.bench_dir(), os.path.join(ROOT, "bench"))


def test_eval_rejects_files_that_are_not_model_files(tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "optimizer": {}}, path)
    assert _exit_code(["eval", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a fastood model file" in err and "model.pt" in err
    assert _exit_code(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_train_eval_and_resume(tmp_path, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--data", "digits-0to4", "--tiny", "--out", str(out), "--cache", str(cache), "--quiet", "--device", "cpu"]
    assert cli.main(["train", "standard", "--steps", "3", *common]) == 0
    printed = capsys.readouterr().out
    assert "Standard (CE) / MSP" in printed and "digits-5to9" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "train standard" and results["config"]["steps"] == 3 and results["config"]["tiny"]
    row = results["rows"]["Standard (CE) / MSP"]
    assert set(row["ood"]) == {"digits-5to9", "gaussian", "uniform", "sphere"}
    assert (out / "model.pt").is_file() and (out / "table.txt").is_file()
    for plot in row["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run into the same folder must not silently overwrite the first.
    assert _exit_code(["train", "standard", "--steps", "3", *common]) == 2
    assert "--resume" in capsys.readouterr().err

    # --resume continues from the checkpoint: 3 more steps, not 5 from scratch.
    assert cli.main(["train", "standard", "--steps", "5", "--resume", "--no-plots", *common]) == 0
    state = torch.load(out / "checkpoints" / "standard" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and len(state["history"]) == 5

    # eval rebuilds the model from model.pt and scores it with another detector.
    capsys.readouterr()
    assert cli.main(["eval", str(out / "model.pt"), "--detector", "energy", "--quiet", "--no-plots",
                     "--out", str(tmp_path / "ev")]) == 0
    assert "Energy" in capsys.readouterr().out
    evaluated = json.loads((tmp_path / "ev" / "results.json").read_text())
    (name, row), = evaluated["rows"].items()
    assert name.startswith("standard / Energy") and set(row["ood"]) == {"digits-5to9", "gaussian", "uniform", "sphere"}
    assert row["plots"] == [] and not (tmp_path / "ev" / "plots").exists()
    train_acc = results["rows"]["Standard (CE) / MSP"]["id_accuracy"]
    assert 0.0 <= row["id_accuracy"] <= 1.0 and train_acc is not None

    # A benchmark with another image shape is refused with a message naming both.
    assert _exit_code(["eval", str(out / "model.pt"), "--data", "mnist5k-0to4", "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "(1, 8, 8)" in err and "(1, 28, 28)" in err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fastood", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("fastood ")


def test_eval_detector_all_fits_and_scores_every_detector(tmp_path, capsys):
    from fastood import demo, detectors

    out, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--data", "digits-0to4", "--tiny", "--cache", str(cache), "--quiet", "--device", "cpu", "--no-plots"]
    assert cli.main(["train", "standard", "--steps", "3", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out / "model.pt"), "--detector", "all", "--quiet", "--no-plots",
                     "--out", str(tmp_path / "ev")]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]
    # Every registered detector a plain classifier supports, one row each; the method-specific ones are left out.
    expected = [k for k in detectors.DETECTORS if k not in demo.METHOD_SPECIFIC_DETECTORS]
    classes = sorted(detectors.DETECTORS[k].__name__ for k in expected)
    assert sorted(r["detector"].split("(")[0] for r in rows.values()) == classes
    for row in rows.values():
        assert set(row["ood"]) == {"digits-5to9", "gaussian", "uniform", "sphere"}
        assert all(0.0 <= m["auroc"] <= 1.0 for m in row["ood"].values())
    # The detectors that learn from ID data were fitted (an unfitted one raises instead of scoring).
    assert any(r["detector"].startswith("ViM") for r in rows.values()) and "DICE" in printed
    # --detector all on image folders is refused before anything is loaded.
    assert _exit_code(["eval", str(out / "model.pt"), "--detector", "all", "--id", str(tmp_path),
                       "--ood", str(tmp_path)]) == 2
    assert "--detector all needs a benchmark" in capsys.readouterr().err


def test_demo_detectors_option(tmp_path, capsys):
    assert _exit_code(["demo", "--detectors", "vim,nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown detector(s) 'nonsense'" in err and "relativemahalanobis" in err
    out = tmp_path / "demo"
    assert cli.main(["demo", "--data", "digits-0to4", "--tiny", "--detectors", "vim,dice,msp", "--out", str(out),
                     "--cache", str(tmp_path / "cache"), "--quiet", "--device", "cpu", "--no-plots"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    names = sorted(rows)
    # The chosen detectors on the pretrained network and after FIG (FIG's own detector, MSP, is listed once).
    assert [n for n in names if n.startswith("pretrained / ")] == ["pretrained / DICE(p=0.9)", "pretrained / MSP",
                                                                    "pretrained / ViM(D=64)"]
    assert [n for n in names if n.startswith("FIG / ")] == ["FIG / DICE(p=0.9)", "FIG / MSP", "FIG / ViM(D=64)"]
