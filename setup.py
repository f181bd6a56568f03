"""Build fastood and its native extension ``fastood._C``.

Switches (environment variables, printed at build start):
  FASTOOD_CUDA=0|1        0: CPU-only build. 1: CUDA build, error if no toolkit. Unset: CUDA when
                          torch has CUDA and a toolkit (CUDA_HOME / nvcc) is found.
  TORCH_CUDA_ARCH_LIST    CUDA archs; default "8.0;9.0" when no GPU is visible.
  FASTOOD_MARCH           extra -march for the CPU kernels (default "native"; "" disables).
  MAX_JOBS                parallel compile jobs (default: number of cores).
  CUDA_HOME               the CUDA toolkit (default: /usr/local/cuda when it exists, else torch's guess).
  FASTOOD_NO_EXTENSION=1  install the Python package only (``make build`` builds the extension in place first).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# torch guesses CUDA_HOME from the nvcc on PATH (here /usr/local/bin -> "/usr/local"); the toolkit's own
# directory is the better default, and it must be set before torch.utils.cpp_extension is imported.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


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
    import torch

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
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_home": toolkit,
        "with_cuda": with_cuda,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "march": os.environ.get("FASTOOD_MARCH", "native"),
        "max_jobs": os.environ.get("MAX_JOBS", str(os.cpu_count())),
    }


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cfg = build_config()
    os.environ.setdefault("MAX_JOBS", cfg["max_jobs"])
    print("fastood build configuration:")
    for key, value in cfg.items():
        print(f"  {key:11s} {value}")

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/python_module.cpp") + rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]  # OpenMP: at::parallel_for threads + `omp simd` loops
    if cfg["march"]:
        cxx.append(f"-march={cfg['march']}")
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


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


if os.environ.get("FASTOOD_NO_EXTENSION") == "1":
    setup()
else:
    setup(ext_modules=extensions(), cmdclass=cmdclass())
