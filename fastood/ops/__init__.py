"""Fused ops of fastood (namespace ``torch.ops.fastood``) with pure-PyTorch references.

Every op dispatches to the native C++/CUDA kernels when the extension is built and the backend is
``"native"``; otherwise to :mod:`fastood.ops.reference`. Select with :func:`set_backend` or
:func:`use_backend`.
"""
from . import reference
from ._backend import (BuildMismatchWarning, backend, build_info, cuda_kernels_available, native_available,
                       set_backend, use_backend)
from .langevin_step import langevin_step_
from .modified_energy import modified_energy, modified_energy_grad
from .nullspace_project import nullspace_project
from .softmax_entropy import softmax_entropy

__all__ = [
    "modified_energy", "modified_energy_grad", "softmax_entropy", "langevin_step_", "nullspace_project",
    "native_available", "cuda_kernels_available", "build_info", "backend", "set_backend", "use_backend",
    "reference", "BuildMismatchWarning",
]
