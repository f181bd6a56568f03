import json
import os
import subprocess
import sys

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
    for row in data["rows"]:
        assert row["reference_ms"] > 0
        if data["meta"]["native"]:
            assert row["native_ms"] > 0 and row["speedup_vs_reference"] > 0
