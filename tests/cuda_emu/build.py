"""Builds the SIMT emulation driver: csrc/cuda/*_kernel.cu compiled by g++ for the host with emu.h, linked with
the scheduler (emu_runtime.cpp) and the script driver (driver.cpp), with ASan + UBSan.

Objects are cached under build/cuda_emu/obj/<hash>.o, keyed by the compiler command and the contents of every
file the translation unit can include from csrc/cuda and tests/cuda_emu, so an unchanged tree links at once and
an edit recompiles only what it touches. ``python tests/cuda_emu/build.py`` builds and prints the binary path.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_SRC = os.path.join(ROOT, "csrc", "cuda")
KERNELS = ["softmax_entropy", "modified_energy", "langevin_step", "nullspace_project"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]


def compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "g++"


def torch_include():
    """torch's header directory, found without importing torch (cheap)."""
    for base in [sysconfig.get_paths()["purelib"]] + sys.path:
        candidate = os.path.join(base, "torch", "include")
        if os.path.isdir(os.path.join(candidate, "ATen")):
            return candidate
    import torch.utils.cpp_extension as ext  # fallback: the slow way

    return ext.include_paths()[0]


def _flags(src_root):
    return (["-std=c++17", "-O1", "-g1", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function",
             "-DFASTOOD_CUDA_EMU"] + SANITIZE +
            ["-I", os.path.join(HERE, "include"), "-I", os.path.dirname(src_root), "-isystem", torch_include()])


def _digest(paths, extra, src_root=None):
    """Hash of the command words and file contents; paths inside src_root count by their relative name, so a
    mutated copy of csrc/cuda shares the objects of the files it leaves unchanged."""
    rel = (lambda p: os.path.relpath(p, src_root) if src_root and p.startswith(src_root + os.sep) else p)
    h = hashlib.sha256()
    for part in extra:
        h.update((part.replace(os.path.dirname(src_root), "<SRC>") if src_root else part).encode())
        h.update(b"\0")
    for path in sorted(paths, key=rel):
        h.update(rel(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:24]


def _inputs(src_root):
    """Every header a translation unit may include from the tree (coarse but safe)."""
    files = [os.path.join(src_root, n) for n in os.listdir(src_root) if n.endswith((".h", ".cuh"))]
    files += [os.path.join(HERE, "emu.h")]
    files += [os.path.join(HERE, "include", n) for n in os.listdir(os.path.join(HERE, "include"))]
    return files


def _compile(cmd, out):
    tmp = out + f".tmp{os.getpid()}"
    proc = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")
    os.replace(tmp, out)
    return out


def build(src_root=CUDA_SRC, out_dir=None, jobs=2):
    """Compiles (or takes from the cache) every object and links the driver; returns the binary's path.

    src_root: a directory laid out as csrc/cuda (a mutated copy for the mutation tests); its parent goes on the
    include path, so ``#include "cuda/..."`` resolves inside the copy.
    """
    out_dir = out_dir or os.path.join(ROOT, "build", "cuda_emu")
    obj_dir = os.path.join(out_dir, "obj")
    os.makedirs(obj_dir, exist_ok=True)
    cxx = compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = _flags(src_root)
    headers = _inputs(src_root)
    units = [(os.path.join(src_root, f"{k}_kernel.cu"), ["-include", os.path.join(HERE, "emu.h"), "-x", "c++"])
             for k in KERNELS]
    units += [(os.path.join(HERE, "emu_runtime.cpp"), []), (os.path.join(HERE, "driver.cpp"), [])]
    jobs_list = []
    for src, extra in units:
        cmd = [cxx] + flags + extra + ["-c", src]
        key = _digest(headers + [src], [version] + cmd[1:-1] + [os.path.basename(src)], src_root)
        jobs_list.append((cmd, os.path.join(obj_dir, f"{os.path.basename(src)}.{key}.o")))
    todo = [(c, o) for c, o in jobs_list if not os.path.exists(o)]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(lambda co: _compile(*co), todo))
    objs = [o for _, o in jobs_list]
    binary = os.path.join(out_dir, "bin", "cuda_emu_driver." + _digest(objs, [version]))
    if not os.path.exists(binary):
        os.makedirs(os.path.dirname(binary), exist_ok=True)
        tmp = binary + f".tmp{os.getpid()}"
        proc = subprocess.run([cxx] + SANITIZE + objs + ["-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"emulation link failed:\n{proc.stderr[-6000:]}")
        os.replace(tmp, binary)
    return binary


def sanitizer_env():
    """Environment for running the driver: sanitizer reports fail the run, leak checking off (fibers' stacks
    live to the end on purpose)."""
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=0"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return env


if __name__ == "__main__":
    print(build())
