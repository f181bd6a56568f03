"""The compute precision of a sampler's forward and input backward: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``.

A sign-gradient Langevin update (FIG Algorithm 1) uses only ``sign(grad_x E)``, so its forward and backward may run
in a 16-bit float type where the device computes one natively; the energy and the confidence that the stop rule
reads stay float32 (the logits are cast to float before :func:`fastood.ops.modified_energy_grad`).

:func:`resolve` turns a requested precision into the autocast dtype of one device:

- ``"fp32"``: no autocast (None), also inside a surrounding autocast, which the sampler switches off.
- ``"bf16"`` / ``"fp16"``: ``torch.autocast(device.type, dtype)`` on CPU and CUDA alike, native or not (a CPU
  without AVX512-BF16/AMX emulates bfloat16 and is usually slower than float32: :func:`bf16_native` says which).
- ``"auto"``: bfloat16 where :func:`bf16_native` holds (and :data:`AUTO_USES_BF16`, True, allows it), else float32.
  Validated by the FIG quality A/B on Fashion-MNIST (docs/fidelity.md, "Sampler precision"): 3 seeds of the
  1000-step protocol, mean AUROC 89.12 +- 0.33 in bfloat16 vs 88.90 +- 0.38 in float32, ID accuracy change -0.47 in
  both, i.e. within the seed spread.

One rule on CPU and CUDA: the sampler's own ``precision`` decides, a surrounding ``torch.autocast`` (a trainer's AMP)
neither switches low precision on nor off inside the sampler.
"""
from __future__ import annotations

import functools
import os

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Whether ``precision="auto"`` may pick bfloat16 where it is native. True since the quality A/B of FIG's sampler
#: (``python bench/quality_fig.py --data fashion-mnist --precision fp32 bf16 --amp bf16 --seeds 3``) showed AUROC
#: and ID accuracy within the seed spread (docs/fidelity.md); False makes "auto" float32 everywhere.
AUTO_USES_BF16 = True


def check_precision(precision) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError naming the argument."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def _cpuinfo_flags() -> set:
    """The CPU feature flags of /proc/cpuinfo (Linux; an empty set elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_bf16_native() -> tuple:
    """``(native, why)``: whether this CPU runs bfloat16 convolutions and matrix products natively, detected at run
    time: torch's CPU kernels run at their AVX-512 level (``torch.backends.cpu.get_cpu_capability()``; a forced
    ``ATEN_CPU_CAPABILITY=avx2`` or a CPU without AVX-512 says no) and the CPU has AVX512-BF16 or AMX-BF16 (torch's
    own probes ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` where present, else the
    /proc/cpuinfo flags). ``$FASTOOD_CPU_BF16=0`` / ``1`` overrides the detection (tests, experiments)."""
    forced = os.environ.get("FASTOOD_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1", f"FASTOOD_CPU_BF16={forced}"
    capability = str(torch.backends.cpu.get_cpu_capability())
    if not capability.upper().startswith("AVX512"):
        return False, f"torch CPU capability {capability} (bfloat16 needs the AVX-512 kernels)"
    probe_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    probe_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe_bf16 is not None and probe_amx is not None:
        avx512_bf16, amx = bool(probe_bf16()), bool(probe_amx())
    else:
        flags = _cpuinfo_flags()
        avx512_bf16, amx = "avx512_bf16" in flags, "amx_bf16" in flags
    if amx or avx512_bf16:
        return True, f"{capability} with {'AMX-BF16' if amx else 'AVX512-BF16'}"
    return False, f"{capability} without AVX512-BF16 or AMX"


def cuda_bf16_native(device) -> tuple:
    """``(native, why)``: compute capability >= 8.0 (Ampere and later have bfloat16 tensor cores)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major >= 8, f"CUDA compute capability {major}.{minor}"


def bf16_native(device) -> tuple:
    """``(native, why)`` for ``device`` (cpu or cuda; other device types: False)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16_native(device)
    if device.type == "cpu":
        return cpu_bf16_native()
    return False, f"device type {device.type}"


def resolve(precision: str, device) -> tuple:
    """``(autocast dtype or None, info)`` of ``precision`` on ``device``.

    ``info``: ``{"precision": "fp32"|"bf16"|"fp16" (what runs), "requested": precision, "bf16_native": bool,
    "why": str}``.
    """
    check_precision(precision)
    native, why = bf16_native(device)
    chosen = precision
    if precision == "auto":
        chosen = "bf16" if native and AUTO_USES_BF16 else "fp32"
        if native and not AUTO_USES_BF16:
            why += "; auto kept fp32 (AUTO_USES_BF16 = False)"
    return _DTYPES[chosen], {"precision": chosen, "requested": precision, "bf16_native": native, "why": why}


def autocast(device, dtype, cache_enabled=True):
    """The sampler's autocast context on ``device``: enabled with ``dtype``, or explicitly disabled (dtype None),
    which overrides a surrounding autocast of the same device type."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        import contextlib
        return contextlib.nullcontext()
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)
