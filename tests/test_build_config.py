"""Build defaults (issue 13 sections 2 and 5, issue 14 section 7): PTX of the newest CUDA arch, no -march=native,
CPU kernels compiled per capability, a loud refusal of a serial (ninja-less) build, and a configuration report
that survives a quiet pip install."""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_constant(name):
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _arch_number(arch):
    return float(arch.replace("+PTX", ""))


def test_default_cuda_arch_list_embeds_ptx_of_the_newest_arch():
    archs = _setup_constant("DEFAULT_CUDA_ARCH_LIST").split(";")
    newest = max(archs, key=_arch_number)
    assert newest.endswith("+PTX"), f"newest arch {newest} must carry +PTX so newer GPUs can JIT the kernels"


def test_ci_and_cmake_defaults_match_setup():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    match = re.search(r'TORCH_CUDA_ARCH_LIST:-([^}"]+)', ci)
    assert match and match.group(1) == _setup_constant("DEFAULT_CUDA_ARCH_LIST")
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    archs = re.search(r"set\(CMAKE_CUDA_ARCHITECTURES ([^)]+)\)", cmake).group(1).split()
    newest = max(archs, key=lambda a: int(a.split("-")[0]))
    assert "-" not in newest, f"CMake's newest arch {newest} must include PTX (no -real suffix)"


def test_no_march_native_by_default_and_every_capability_compiled():
    source = open(os.path.join(ROOT, "setup.py")).read()
    assert re.search(r'os\.environ\.get\("FASTOOD_MARCH", ""\)', source)
    flags = _setup_constant("CPU_CAPABILITY_FLAGS")
    assert set(flags) == {"default", "avx2", "avx512"} and flags["default"] == []
    assert {"-mavx2", "-mfma"} <= set(flags["avx2"]) and "-mavx512f" in flags["avx512"]
    assert all(f"kernels_{cap}.cpp" in os.listdir(os.path.join(ROOT, "csrc", "cpu", "kernels")) for cap in flags)


def _run_setup(tmp_path, **env):
    full = dict(os.environ, FASTOOD_CUDA="0", FASTOOD_BUILD_LOG=str(tmp_path / "build.log"), **env)
    # `build_ext --help` configures the build (setup.py does that for commands that compile) and exits before
    # compiling; metadata commands such as --name no longer import torch (issue 21, tests/test_sdist.py)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--help"], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=300)


def test_setup_refuses_a_build_without_ninja_and_logs_the_configuration(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _run_setup(tmp_path, PATH=str(empty))  # no ninja on PATH
    assert out.returncode != 0
    assert "ninja is not installed" in out.stderr and "pip install ninja pybind11" in out.stderr
    assert "FASTOOD_ALLOW_SERIAL=1" in out.stderr
    log = (tmp_path / "build.log").read_text()
    for key in ("with_cuda", "arch_list", "cpu_capabilities", "max_jobs", "ninja"):
        assert key in log and key in out.stderr


def test_setup_allows_a_serial_build_when_asked(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _run_setup(tmp_path, PATH=str(empty), FASTOOD_ALLOW_SERIAL="1")
    assert out.returncode == 0, out.stderr
    assert "--inplace" in out.stdout  # build_ext's help: setup.py went on to run the command
    assert "WARNING: ninja is missing" in out.stderr
