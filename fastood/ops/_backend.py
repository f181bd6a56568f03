"""Which implementation the ops use: the native extension ``fastood._C`` or the pure-PyTorch reference.

If the extension cannot be imported, ``import fastood`` still works: a warning is issued once and
every op runs its reference implementation.
"""
import contextlib
import importlib.util
import os
import warnings

import torch

_BACKENDS = ("native", "reference")

#: how a fastood extension is rebuilt against the torch in use (pip caches the wheel it built from an sdist, hence
#: --no-cache-dir; --no-deps keeps the torch that is installed)
REINSTALL_HINT = "pip install --no-build-isolation --no-cache-dir --force-reinstall --no-deps fastood"
_MARKER = b"FASTOOD-BUILD-VERSIONS "


class BuildMismatchWarning(RuntimeWarning):
    """The native extension was compiled against another torch than the one running (it may fail to load, or load
    and misbehave): rebuild it with :data:`REINSTALL_HINT`."""


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


def _library_path():
    """The file of the native library (loaded or not), or None when there is none."""
    if os.environ.get("FASTOOD_LIBRARY"):
        return os.environ["FASTOOD_LIBRARY"]
    try:
        spec = importlib.util.find_spec("fastood._C")
    except (ImportError, ValueError):
        return None
    return None if spec is None else spec.origin


def parse_build_versions(text):
    """``"torch=2.13.0+cu130 cuda=13.0"`` (``torch.ops.fastood.build_versions()``) -> ``{"torch": ..., "cuda": ...}``
    (``cuda``: torch.version.cuda at build time, ``"none"`` for a CPU torch, ``"unknown"`` for the CMake library)."""
    fields = dict(part.split("=", 1) for part in str(text).split() if "=" in part)
    return {"torch": fields.get("torch"), "cuda": fields.get("cuda")}


def build_versions_in_file(path):
    """The build versions embedded in a native library file, read without loading it (so also for a library that
    cannot be loaded, e.g. one built against another torch); None for a library built before they were recorded."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, TypeError):
        return None
    start = data.find(_MARKER + b"torch=")
    if start < 0:
        return None
    end = data.find(b"\0", start)
    return parse_build_versions(data[start + len(_MARKER):end if end >= 0 else None].decode("ascii", "replace"))


def versions_differ(built: str, running: str) -> bool:
    """Whether a library built against torch ``built`` needs a rebuild for torch ``running``: another release, or
    another local build tag (``+cu130`` vs ``+cpu``) where both carry one (the CMake library records no tag)."""
    b_public, _, b_local = str(built).partition("+")
    r_public, _, r_local = str(running).partition("+")
    return b_public != r_public or bool(b_local and r_local and b_local != r_local)


def mismatch_message(built: dict, running: str = None) -> str:
    """"fastood was built against torch X, this is torch Y: reinstall with ..." (the import-time warning)."""
    running = torch.__version__ if running is None else running
    cuda = f" (CUDA {built['cuda']})" if built.get("cuda") not in (None, "unknown") else ""
    return (f"fastood was built against torch {built['torch']}{cuda}, this is torch {running} (CUDA "
            f"{torch.version.cuda or 'none'}): reinstall with `{REINSTALL_HINT}` (in a source checkout: `pip install "
            "--no-build-isolation .`) so that the extension is compiled against this torch")


_BUILT = None
try:
    _load_native()
    _NATIVE = True
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    _NATIVE = False
    _IMPORT_ERROR = exc
    _BUILT = build_versions_in_file(_library_path())
    if _BUILT is not None and versions_differ(_BUILT["torch"], torch.__version__):
        warnings.warn(f"{mismatch_message(_BUILT)}. The native extension cannot be loaded ({exc}); using the "
                      "pure-PyTorch reference ops.", BuildMismatchWarning, stacklevel=2)
    else:
        warnings.warn(
            f"fastood native extension not available ({exc}); using the pure-PyTorch reference ops. "
            "Build it with `pip install --no-build-isolation .`.", RuntimeWarning, stacklevel=2)
if _NATIVE:
    if hasattr(torch.ops.fastood, "build_versions"):
        _BUILT = parse_build_versions(torch.ops.fastood.build_versions())
    if _BUILT is not None and versions_differ(_BUILT["torch"], torch.__version__):
        warnings.warn(mismatch_message(_BUILT), BuildMismatchWarning, stacklevel=2)

_current = "native" if _NATIVE else "reference"
_warned_no_cuda = False


def native_available() -> bool:
    """True when the compiled extension ``fastood._C`` was imported."""
    return _NATIVE


def cuda_kernels_available() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _NATIVE and bool(torch.ops.fastood.cuda_built())


def build_info() -> dict:
    """What was built: ``{"native": bool, "cuda_kernels": bool, "torch": str, "torch_cuda": str|None,
    "built_torch": str|None, "built_cuda": str|None, "error": str|None, "cpu_capability": str|None,
    "cpu_capabilities": [str]}``.

    ``torch``/``torch_cuda``: the running torch and its ``torch.version.cuda``; ``built_torch``/``built_cuda``: those
    the extension was compiled against (read from the library file when it cannot be loaded; None when there is no
    library or it predates this record; ``built_cuda`` is ``"none"`` for a CPU torch). They differ: rebuild with
    :data:`REINSTALL_HINT`.

    ``cpu_capability``: the instruction set the CPU kernels run with ("default", "avx2" or "avx512": the best
    compiled one this CPU supports, or ``$FASTOOD_CPU_CAPABILITY``); ``cpu_capabilities``: those compiled in.
    """
    built = _BUILT or {}
    info = {"native": _NATIVE, "cuda_kernels": cuda_kernels_available(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "built_torch": built.get("torch"), "built_cuda": built.get("cuda"),
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
