"""Build fastood and its native extension ``fastood._C``.

Switches (environment variables; the configuration is printed to stderr at build start and written to
build/fastood-build.log, which stays readable after a quiet ``pip install``):
  FASTOOD_CUDA=0|1        0: CPU-only build. 1: CUDA build, error if no toolkit. Unset: CUDA when
                          torch has CUDA and a toolkit (CUDA_HOME / nvcc) is found.
  TORCH_CUDA_ARCH_LIST    CUDA archs; default "8.0;9.0+PTX" when no GPU is visible (PTX of the newest arch lets
                          newer GPUs JIT-compile the kernels instead of failing with "no kernel image").
  FASTOOD_CPU_CAPABILITIES which instruction sets to compile the CPU kernels for, e.g. "default;avx2"
                          (default on x86-64: "default;avx2;avx512"; elsewhere "default"). The best one the CPU
                          supports is chosen at run time; FASTOOD_CPU_CAPABILITY=default|avx2|avx512 forces one.
  FASTOOD_MARCH           -march for the non-kernel C++ (default "": portable; "native" ties the build to this
                          CPU's instruction set, which then dies with an illegal instruction on an older one).
  MAX_JOBS                parallel compile jobs (default: number of cores).
  CUDA_HOME               the CUDA toolkit (default: /usr/local/cuda when it exists, else torch's guess).
  FASTOOD_ALLOW_SERIAL=1  build without ninja (one file at a time: a CUDA build then takes about half an hour).
  FASTOOD_NO_EXTENSION=1  install the Python package only (``make build`` builds the extension in place first).

The extension is compiled against the torch that runs this script and only loads with that torch, so it must be the
torch you will use: build with ``pip install --no-build-isolation .`` (or ``python -m build --no-isolation``).
pyproject.toml does not list torch as a build requirement, so an isolated build (plain ``pip install .``) stops
with an error that says so, instead of compiling against a torch fetched for the build and installing an extension
that fails to load (README, "Install"). Commands that only read metadata or pack the sources (``sdist``,
``egg_info``, ``dist_info``, ``--name``, ...) do not import torch.
"""
import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch guesses CUDA_HOME from the nvcc on PATH (here /usr/local/bin -> "/usr/local"); the toolkit's own
# directory is the better default, and it must be set before torch.utils.cpp_extension is imported.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


# setup.py commands that compile the extension; any other invocation (sdist, egg_info, dist_info, --name, --version,
# check, clean) only reads metadata or packs files and must work without torch (tests/test_sdist.py).
BUILD_COMMANDS = ("build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "bdist_dumb", "bdist_rpm", "install",
                  "install_lib", "develop", "editable_wheel")

NO_TORCH_HELP = (
    "fastood's native extension is compiled against the torch you run it with, and torch cannot be imported by "
    "this build ({error}). A plain `pip install .` (or `pip install fastood`, `python -m build`) builds in an "
    "isolated environment that hides your torch; fastood does not ask for a torch there, because the one pip would "
    "fetch is usually another version than yours and the extension then fails to load. Install torch first, then "
    "build against it: `pip install ninja pybind11 setuptools wheel` and `pip install --no-build-isolation .` "
    "(from an sdist: `pip install --no-build-isolation fastood-X.tar.gz`; a wheel: `python -m build --wheel "
    "--no-isolation`). FASTOOD_NO_EXTENSION=1 installs the Python package alone (pure-PyTorch reference ops).")


def builds_extension(argv) -> bool:
    """Whether this setup.py invocation compiles the extension (and so needs torch)."""
    return any(arg in BUILD_COMMANDS for arg in argv[1:])


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise SystemExit("fastood: error: " + NO_TORCH_HELP.format(error=f"{type(exc).__name__}: {exc}")) from None
    return torch


def _cuda_toolkit():
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME


def _nvidia_pip_includes():
    """Headers of the pip-installed CUDA libraries (cuBLAS, cuRAND, ...) that torch depends on."""
    dirs = []
    for path in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/curand/include"):
            candidate = os.path.join(path, sub)
            if os.path.isdir(candidate) and candidate not in dirs:
                dirs.append(candidate)
    return dirs


def build_config():
    torch = _import_torch()

    request = os.environ.get("FASTOOD_CUDA", "").strip()
    if request not in ("", "0", "1"):
        raise SystemExit(f"FASTOOD_CUDA must be 0, 1 or unset, got {request!r}")
    toolkit = _cuda_toolkit()
    torch_cuda = torch.version.cuda is not None
    if request == "1" and not (torch_cuda and toolkit):
        raise SystemExit(
            "FASTOOD_CUDA=1 but a CUDA build is not possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={toolkit!r}. "
            "Install a CUDA build of torch and set CUDA_HOME to the toolkit (e.g. /usr/local/cuda).")
    with_cuda = request != "0" and torch_cuda and toolkit is not None
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    from torch.utils.cpp_extension import is_ninja_available

    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_home": toolkit,
        "with_cuda": with_cuda,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "cpu_capabilities": cpu_capabilities(),
        "march": os.environ.get("FASTOOD_MARCH", ""),
        "max_jobs": os.environ.get("MAX_JOBS", str(os.cpu_count())),
        "ninja": is_ninja_available(),
    }


# Used when no GPU is visible at build time: Ampere and Hopper SASS, plus Hopper PTX that the driver JIT-compiles
# on newer GPUs (tests/test_build_config.py reads this value).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# The CPU kernels (csrc/cpu/kernels/) are compiled once per capability with these flags, ATen-style; the rest of
# the C++ stays portable. All capability units get -O3, no errno from math builtins, FMA contraction, and
# `omp simd` without an OpenMP runtime.
CPU_CAPABILITY_COMMON_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp-simd"]
CPU_CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-mprefer-vector-width=512"],
}


def cpu_capabilities():
    """Capabilities to compile: $FASTOOD_CPU_CAPABILITIES (";"- or ","-separated) or all of this architecture's."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    available = list(CPU_CAPABILITY_FLAGS) if x86 else ["default"]
    request = os.environ.get("FASTOOD_CPU_CAPABILITIES", "").replace(",", ";").strip()
    if not request:
        return available
    names = [n.strip() for n in request.split(";") if n.strip()]
    bad = [n for n in names if n not in available]
    if bad:
        raise SystemExit(f"FASTOOD_CPU_CAPABILITIES must list capabilities of {available}, got {request!r}")
    return ["default"] + [n for n in available if n in names and n != "default"]


def extensions():
    _import_torch()  # first: without torch, the error that says why and what to run
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cfg = build_config()
    os.environ.setdefault("MAX_JOBS", cfg["max_jobs"])
    report_config(cfg)
    if not cfg["ninja"] and os.environ.get("FASTOOD_ALLOW_SERIAL") != "1":
        raise SystemExit(
            "fastood: ninja is not installed, so the extension would compile one file at a time (a CUDA build then "
            "takes about half an hour, silently). Install it first: `pip install ninja pybind11` (with "
            "--no-build-isolation the build-system requirements are not installed for you), or set "
            "FASTOOD_ALLOW_SERIAL=1 to build serially anyway.")

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/python_module.cpp") + rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]  # OpenMP: at::parallel_for threads + `omp simd` loops
    if cfg["march"]:
        cxx.append(f"-march={cfg['march']}")
    cxx += [f"-DFASTOOD_CPU_HAVE_{cap.upper()}" for cap in cfg["cpu_capabilities"] if cap != "default"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not cfg["with_cuda"]:
        return [CppExtension("fastood._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
    include_dirs += _nvidia_pip_includes()
    return [CUDAExtension(
        "fastood._C", sources, include_dirs=include_dirs,
        define_macros=[("FASTOOD_WITH_CUDA", None)], extra_link_args=["-fopenmp"],
        extra_compile_args={"cxx": cxx + ["-DFASTOOD_WITH_CUDA"],
                            "nvcc": ["-O3", "-DFASTOOD_WITH_CUDA"]})]


BUILD_LOG = os.environ.get("FASTOOD_BUILD_LOG") or os.path.join(ROOT, "build", "fastood-build.log")


def report_config(cfg):
    """Print the build configuration to stderr and write it to BUILD_LOG: pip shows neither stream of a
    successful build without -v, but the log stays."""
    lines = ["fastood build configuration:"] + [f"  {key:17s} {value}" for key, value in cfg.items()]
    lines.append(f"  (also written to {BUILD_LOG})")
    if not cfg["ninja"]:
        lines.append("  WARNING: ninja is missing: serial build (pip install ninja)")
    print("\n".join(lines), file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(BUILD_LOG), exist_ok=True)
    with open(BUILD_LOG, "w") as f:
        f.write("\n".join(lines) + "\n")


def version_header(torch_version: str, torch_cuda) -> str:
    """fastood_build_versions.h: the torch (and torch.version.cuda) the extension is compiled against; csrc/ops.cpp
    embeds them (``torch.ops.fastood.build_versions()``, and a marker fastood/ops/_backend.py reads from the file when
    the library cannot be loaded)."""
    def literal(value):
        return '"' + str(value).replace("\\", "").replace('"', "") + '"'

    return ("// Generated by setup.py at build time: the torch this extension is compiled against.\n"
            f"#define FASTOOD_BUILT_TORCH {literal(torch_version)}\n"
            f"#define FASTOOD_BUILT_TORCH_CUDA {literal(torch_cuda or 'none')}\n")


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class BuildWithCpuCapabilities(BuildExtension):
        """Compiles csrc/cpu/kernels/kernels_<cap>.cpp once per capability with that capability's flags (setuptools
        applies one flag set per extension), then links the objects into fastood._C with the other sources."""

        def build_extension(self, ext):
            import torch

            generated = os.path.join(os.path.abspath(self.build_temp), "fastood_generated")
            os.makedirs(generated, exist_ok=True)
            header = os.path.join(generated, "fastood_build_versions.h")
            text = version_header(torch.__version__, torch.version.cuda)
            if not os.path.exists(header) or open(header).read() != text:  # unchanged: no needless recompile
                with open(header, "w") as f:
                    f.write(text)
            ext.include_dirs = list(ext.include_dirs) + [generated]
            objects = []
            for cap in cpu_capabilities():
                source = os.path.join("csrc", "cpu", "kernels", f"kernels_{cap}.cpp")
                flags = ["-std=c++17", "-fPIC"] + CPU_CAPABILITY_COMMON_FLAGS + CPU_CAPABILITY_FLAGS[cap]
                objects += self.compiler.compile(
                    [source], output_dir=os.path.join(self.build_temp, f"cpu_{cap}"), include_dirs=ext.include_dirs,
                    extra_postargs={"cxx": flags, "nvcc": []}, depends=glob.glob(os.path.join(ROOT, "csrc", "cpu",
                                                                                              "kernels", "*.h")))
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

    return {"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=True)}


if os.environ.get("FASTOOD_NO_EXTENSION") == "1" or not builds_extension(sys.argv):
    setup()
else:
    setup(ext_modules=extensions(), cmdclass=cmdclass())
