import os
import subprocess
import sys

import pytest
import torch

import fastood.ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_use_backend_restores_previous():
    before = ops.backend()
    with ops.use_backend("reference"):
        assert ops.backend() == "reference"
        x = torch.randn(4, 3)
        torch.testing.assert_close(ops.softmax_entropy(x), ops.reference.softmax_entropy(x))
    assert ops.backend() == before


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")


def test_missing_extension_falls_back_to_reference_with_one_warning():
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastood.ops as ops\n"
            "    x = torch.randn(3, 4)\n"
            "    ops.softmax_entropy(x); ops.modified_energy(x)\n"
            "print(ops.backend(), ops.native_available(), sum('native extension not available' in str(m.message) for m in w))\n"
            "try:\n"
            "    ops.set_backend('native')\n"
            "except RuntimeError as e:\n"
            "    print('refused')\n")
    env = dict(os.environ, FASTOOD_LIBRARY="/nonexistent/libfastood.so", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[:3] == ["reference", "False", "1"] and lines[3] == "refused"


def test_build_info_reports_what_was_built():
    info = ops.build_info()
    assert info["native"] == ops.native_available()
    assert info["cuda_kernels"] == ops.cuda_kernels_available()
    assert info["torch"] == torch.__version__
