"""Which implementation the ops use: the native extension ``fastood._C`` or the pure-PyTorch reference.

If the extension cannot be imported, ``import fastood`` still works: a warning is issued once and
every op runs its reference implementation.
"""
import contextlib
import warnings

import torch

_BACKENDS = ("native", "reference")

import os


def _load_native():
    """Load the kernels: ``$FASTOOD_LIBRARY`` (a library built elsewhere, e.g. by CMake) or ``fastood._C``."""
    path = os.environ.get("FASTOOD_LIBRARY")
    if path:
        try:
            torch.ops.load_library(path)
        except OSError as exc:
            raise ImportError(f"FASTOOD_LIBRARY={path!r} could not be loaded: {exc}") from exc
        return
    from fastood import _C  # noqa: F401  (loading it registers torch.ops.fastood.*)


try:
    _load_native()
    _NATIVE = True
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _NATIVE = False
    _IMPORT_ERROR = exc
    warnings.warn(
        f"fastood native extension not available ({exc}); using the pure-PyTorch reference ops. "
        "Build it with `pip install --no-build-isolation .`.", RuntimeWarning, stacklevel=2)

_current = "native" if _NATIVE else "reference"
_warned_no_cuda = False


def native_available() -> bool:
    """True when the compiled extension ``fastood._C`` was imported."""
    return _NATIVE


def cuda_kernels_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _NATIVE and bool(torch.ops.fastood.cuda_built())


def build_info() -> dict:
    """What was built: ``{"native": bool, "cuda_kernels": bool, "torch": str, "error": str|None,
    "cpu_capability": str|None, "cpu_capabilities": [str]}``.

    ``cpu_capability``: the instruction set the CPU kernels run with ("default", "avx2" or "avx512": the best
    compiled one this CPU supports, or ``$FASTOOD_CPU_CAPABILITY``); ``cpu_capabilities``: those compiled in.
    """
    info = {"native": _NATIVE, "cuda_kernels": cuda_kernels_available(), "torch": torch.__version__,
            "error": None if _IMPORT_ERROR is None else str(_IMPORT_ERROR), "cpu_capability": None,
            "cpu_capabilities": []}
    if _NATIVE and hasattr(torch.ops.fastood, "cpu_capability"):
        info["cpu_capabilities"] = list(torch.ops.fastood.cpu_capabilities())
        info["cpu_capability"] = torch.ops.fastood.cpu_capability()  # raises on a bad $FASTOOD_CPU_CAPABILITY
    return info


def backend() -> str:
    """The backend in use: ``"native"`` or ``"reference"``."""
    return _current


def set_backend(name: str) -> None:
    """Select ``"native"`` (fused kernels) or ``"reference"`` (pure PyTorch) for every op."""
    global _current
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "native" and not _NATIVE:
        raise RuntimeError(f"backend 'native' requested but fastood._C failed to import: {_IMPORT_ERROR}")
    _current = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed code with backend ``name``, then restore the previous one."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_native(*tensors: torch.Tensor) -> bool:
    """Whether an op on ``tensors`` should dispatch to the native kernels."""
    global _warned_no_cuda
    if _current != "native":
        return False
    if any(t.is_cuda for t in tensors) and not cuda_kernels_available():
        if not _warned_no_cuda:
            warnings.warn("fastood was built without CUDA kernels; CUDA tensors use the reference ops.",
                          RuntimeWarning, stacklevel=3)
            _warned_no_cuda = True
        return False
    return True
