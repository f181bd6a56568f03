import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ops_quick_writes_table_and_json(tmp_path):
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ops.py"), "--quick", "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "modified_energy_grad" in proc.stdout and "nullspace_project" in proc.stdout
    data = json.loads(out.read_text())
    ops = {row["op"] for row in data["rows"]}
    assert ops == {"modified_energy_grad", "softmax_entropy fwd+bwd", "langevin_step_", "nullspace_project"}
    assert {(row["op"], row["dtype"]) for row in data["rows"]} >= {("modified_energy_grad", "bf16"),
                                                                   ("softmax_entropy fwd+bwd", "bf16"),
                                                                   ("langevin_step_", "bf16")}
    for row in data["rows"]:
        assert row["reference_ms"] > 0
        assert row["bytes"] > 0 and row["flops"] > 0
        if data["meta"]["native"]:
            assert row["native_ms"] > 0 and row["speedup_vs_reference"] > 0
            # work and the fraction of the CPU's measured FMA peak (the GEMM rate and nominal peak printed beside it)
            assert row["native_gflops"] == pytest.approx(row["flops"] / row["native_ms"] / 1e6)
            if data["meta"]["peaks"][row["dtype"]]["flops"]:
                assert 0 < row["pct_peak_flops"] < 100
    assert "peak (fp32): CPU: measured FMA throughput" in proc.stdout and "FMA pipes" in proc.stdout
    if data["meta"]["native"]:
        assert data["meta"]["cpu_capability"] in {"default", "avx2", "avx512"}


def test_bench_ops_times_every_capability_in_one_run(tmp_path):
    out = tmp_path / "ops.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_ops.py"), "--quick", "--device", "cpu",
                           "--dtypes", "fp32", "--all-capabilities", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    if not data["meta"]["native"]:
        pytest.skip("native extension not built")
    timed = data["meta"]["capabilities_timed"]
    assert timed[0] == "default" and data["meta"]["cpu_capability"] == timed[-1]
    for row in data["rows"]:
        assert set(row.get("native_ms_by_capability", {timed[0]: 1})) == set(timed)
