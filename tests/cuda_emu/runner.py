"""Python side of the SIMT emulation: stage tensors into a driver script, run the emulated kernels, read the
outputs back as tensors (tests/test_cuda_emu.py).

A ``Session`` collects buffers and launcher calls; ``run()`` executes them all in one driver process (with
ASan + UBSan) and returns the saved outputs. Launcher arguments mirror csrc/cuda/<op>_kernel.h.
"""
import os
import platform
import shutil
import subprocess

import numpy as np
import torch

from build import sanitizer_env

DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}


class EmulationError(RuntimeError):
    """The driver failed: an emulation misuse check, a sanitizer report, the watchdog or a bad script."""

    def __init__(self, returncode, stderr):
        super().__init__(f"emulated run failed with status {returncode}:\n{stderr[-4000:]}")
        self.returncode = returncode
        self.stderr = stderr


class Session:
    def __init__(self, binary, workdir, schedule="forward"):
        self.binary, self.workdir, self.schedule = binary, workdir, schedule
        self.lines, self.outputs, self._n = [], {}, 0
        os.makedirs(workdir, exist_ok=True)

    def _name(self):
        self._n += 1
        return f"b{self._n}"

    def buffer(self, tensor=None, *, like=None, numel=None, dtype=None, misalign=False):
        """A device buffer holding ``tensor`` (C order), or an uninitialized (NaN-filled) one of ``numel``
        elements of ``dtype``. misalign: start one element past a 16-byte boundary. Returns its name."""
        name = self._name()
        if tensor is not None:
            t = tensor.detach().contiguous().cpu()
            dtype, numel = t.dtype, t.numel()
            path = os.path.join(self.workdir, name + ".in")
            t.view(-1).view(torch.uint8).numpy().tofile(path) if numel else open(path, "wb").close()
        else:
            path = "-"
        itemsize = torch.empty((), dtype=dtype).element_size()
        shift = itemsize if misalign else 0
        self.lines.append(f"buf {name} {numel * itemsize} {shift} {path}")
        self._meta = getattr(self, "_meta", {})
        self._meta[name] = (dtype, numel)
        return name

    def save(self, name, shape, key):
        """Read buffer ``name`` back after the run, as result[key] with ``shape``."""
        path = os.path.join(self.workdir, f"{name}.out")
        self.lines.append(f"save {name} {path}")
        self.outputs[key] = (path, self._meta[name][0], tuple(shape))

    def call(self, *words):
        self.lines.append(" ".join(_word(w) for w in words))

    def run(self, timeout=900):
        script = os.path.join(self.workdir, "script.txt")
        with open(script, "w") as f:
            f.write("\n".join(self.lines) + "\n")
        env = sanitizer_env()
        env["FASTOOD_EMU_SCHEDULE"] = self.schedule
        proc = subprocess.run([self.binary, script], capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0 and "AddressSanitizer:DEADLYSIGNAL" in proc.stderr and shutil.which("setarch"):
            # Older ASan runtimes crash at start-up under the 32-bit mmap randomization of newer kernels: retry
            # once without address-space randomization.
            proc = subprocess.run(["setarch", platform.machine(), "-R", self.binary, script], capture_output=True,
                                  text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise EmulationError(proc.returncode, proc.stderr)
        result = {}
        for key, (path, dtype, shape) in self.outputs.items():
            raw = np.fromfile(path, dtype=np.uint8)
            result[key] = torch.from_numpy(raw.copy()).view(dtype).reshape(shape)
        result["stdout"] = proc.stdout
        return result


def _word(w):
    if w is None:
        return "-"
    if isinstance(w, bool):
        return str(int(w))
    if isinstance(w, float):
        return repr(w)
    if isinstance(w, torch.dtype):
        return DTYPE_NAMES[w]
    return str(w)
