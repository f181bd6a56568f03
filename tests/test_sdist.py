"""A release that installs (issue 21 section 2): the sdist holds every source the build needs and is built without
torch; an isolated build (plain ``pip install .``) stops with an error naming ``--no-build-isolation`` instead of
compiling against a torch fetched for the build; the extension records the torch it was built against and the
import says so when it differs. scripts/check_sdist_install.sh (CI) installs the sdist into a fresh venv."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import fastood.ops as ops
from fastood.ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the sdist must hold: everything tracked under these paths (csrc's headers and capability kernels included)
SDIST_PATHS = ("csrc", "fastood", "tests/cpp", "CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in",
               "README.md", "LICENSE")
BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # `import torch` raises ImportError\n"
RUN_SETUP = "import runpy\nsys.argv = ['setup.py', '{command}']\nrunpy.run_path('setup.py', run_name='__main__')\n"


def _git_files(*paths):
    """Files git tracks (or would: new, not ignored) under ``paths``; skips when this is not a git checkout."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot list the checkout's files")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *paths], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()}): cannot list the files the sdist must hold")
    return sorted(f for f in out.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f)))


def test_build_requirements_do_not_include_torch():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    names = [r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in requires]
    assert "torch" not in names, (f"build-system requires {requires}: an isolated build would compile against a torch "
                                  "fetched for it, not the user's (issue 21)")
    assert {"setuptools", "ninja", "pybind11"} <= set(names)


def test_sdist_is_built_without_torch_and_holds_every_source(tmp_path):
    src = tmp_path / "src"
    for f in _git_files():  # a clean copy of the checkout: nothing built here (_C*.so, build/) can leak in
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    code = BLOCK_TORCH + "from setuptools import build_meta\nprint(build_meta.build_sdist(sys.argv[1]))\n"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"the sdist could not be built without torch:\n{out.stderr[-3000:]}"
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "dist" / name) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    missing = [f for f in _git_files(*SDIST_PATHS) if f not in members]
    assert not missing, f"the sdist {name} lacks files the build needs: {missing}"
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))], "build products in the sdist"


def test_a_build_without_torch_stops_with_an_error_naming_no_build_isolation(tmp_path):
    """What plain `pip install .` runs: setup.py bdist_wheel in an isolated environment that holds no torch."""
    code = BLOCK_TORCH + RUN_SETUP.format(command="bdist_wheel")
    env = dict(os.environ, FASTOOD_BUILD_LOG=str(tmp_path / "build.log"))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    message = " ".join(out.stderr.split())
    assert "fastood: error:" in message and "torch cannot be imported" in message, message[-2000:]
    assert "pip install --no-build-isolation ." in message and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "build.log")  # stopped before configuring a build


def test_metadata_commands_do_not_need_torch(tmp_path):
    code = BLOCK_TORCH + RUN_SETUP.format(command="--name")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, FASTOOD_BUILD_LOG=str(tmp_path / "build.log")))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "fastood"


def test_check_sdist_install_script_is_there_for_ci():
    script = os.path.join(ROOT, "scripts", "check_sdist_install.sh")
    text = open(script).read()
    assert os.access(script, os.X_OK)
    assert "--no-build-isolation" in text and 'info["native"]' in text


# ----------------------------------------------------------------------------------- the torch it was built against
def test_build_versions_are_compared_by_release_and_local_tag():
    assert not _backend.versions_differ("2.13.0+cu130", "2.13.0+cu130")
    assert _backend.versions_differ("2.14.1+cu130", "2.13.0+cu130")  # the trial's isolated build
    assert _backend.versions_differ("2.13.0+cpu", "2.13.0+cu130")
    assert not _backend.versions_differ("2.13.0", "2.13.0+cu130")  # the CMake library records no local tag
    assert _backend.parse_build_versions("torch=2.13.0+cu130 cuda=13.0") == {"torch": "2.13.0+cu130", "cuda": "13.0"}


def _library_with_marker(tmp_path, torch_version, cuda="none"):
    """A file that is not a loadable library but carries the build record, as one built against another torch."""
    path = tmp_path / "libfastood_other_torch.so"
    path.write_bytes(b"\x7fELF garbage" * 100 + b"\0FASTOOD-BUILD-VERSIONS torch=" + torch_version.encode()
                     + b" cuda=" + cuda.encode() + b"\0more" * 10)
    return str(path)


def test_the_record_is_read_from_a_library_file_without_loading_it(tmp_path):
    path = _library_with_marker(tmp_path, "2.14.1+cu130", "13.0")
    assert _backend.build_versions_in_file(path) == {"torch": "2.14.1+cu130", "cuda": "13.0"}
    (tmp_path / "old.so").write_bytes(b"\x7fELF no record")
    assert _backend.build_versions_in_file(str(tmp_path / "old.so")) is None
    assert _backend.build_versions_in_file(str(tmp_path / "missing.so")) is None


def _import_fastood(env_extra, prelude=""):
    code = ("import warnings\n" + prelude + "import torch\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import fastood.ops as ops\n"
            "for w in caught:\n"
            "    print('WARNING', type(w.category).__name__, w.category.__name__, ' '.join(str(w.message).split()))\n"
            "info = ops.build_info()\n"
            "print('INFO', info['native'], info['built_torch'], info['built_cuda'], info['torch'])\n")
    env = dict(os.environ, PYTHONPATH=ROOT, **env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_library_built_against_another_torch_names_both_at_import(tmp_path):
    """The trial: an isolated build against torch 2.14.1 failed to load under 2.13.0 with an undefined symbol, and
    the warning did not say which torch the extension wanted."""
    out = _import_fastood({"FASTOOD_LIBRARY": _library_with_marker(tmp_path, "2.14.1+cu130", "13.0")})
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert "BuildMismatchWarning" in warning
    assert f"fastood was built against torch 2.14.1+cu130 (CUDA 13.0), this is torch {torch.__version__}" in warning
    assert "reinstall with `pip install --no-build-isolation" in warning and "reference ops" in warning
    assert f"INFO False 2.14.1+cu130 13.0 {torch.__version__}" in out


def test_a_library_that_loads_under_another_torch_version_warns(tmp_path):
    if not ops.native_available() or ops.build_info()["built_torch"] is None:
        pytest.skip("the native extension is not built, or predates the build record: rebuild it (make build)")
    out = _import_fastood({}, prelude="import torch; torch.__version__ = '9.9.9'\n")
    warning = next((line for line in out.splitlines() if line.startswith("WARNING")), "")
    assert "BuildMismatchWarning" in warning, out
    assert f"fastood was built against torch {torch.__version__}" in warning and "this is torch 9.9.9" in warning


def test_build_info_reports_the_torch_the_extension_was_built_against():
    info = ops.build_info()
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    if not ops.native_available() or not hasattr(torch.ops.fastood, "build_versions"):
        pytest.skip("the native extension is not built, or predates the build record: rebuild it (make build)")
    assert info["built_torch"] == torch.__version__  # the tests run with the torch it was built with
    assert info["built_cuda"] == (torch.version.cuda or "none")
    assert _backend.build_versions_in_file(_backend._library_path()) == {"torch": info["built_torch"],
                                                                          "cuda": info["built_cuda"]}
