"""Build a subset of the native sources into a loadable library, for fast iteration on one op.

    python scripts/dev_lib.py BUILD_DIR csrc/cpu/softmax_entropy.cpp [csrc/cuda/... .cu ...]
    FASTOOD_LIBRARY=BUILD_DIR/fastood_dev.so python -m pytest tests/test_op_softmax_entropy.py

csrc/ops.cpp (the schemas) is always included. With .cu sources the library is a CUDA build
(TORCH_CUDA_ARCH_LIST defaults to 8.0;9.0 when no GPU is visible).
"""
import os
import sys

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    if len(argv) < 1:
        raise SystemExit(__doc__)
    build_dir = os.path.abspath(argv[0])
    os.makedirs(build_dir, exist_ok=True)
    sources = [os.path.join(ROOT, "csrc", "ops.cpp")] + [os.path.abspath(s) for s in argv[1:]]
    with_cuda = any(s.endswith(".cu") for s in sources)
    flags = ["-O3"] + (["-DFASTOOD_WITH_CUDA"] if with_cuda else [])
    includes = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        for path in sys.path:
            inc = os.path.join(path, "nvidia", "cu13", "include")
            if os.path.isdir(inc):
                includes.append(inc)
    cpp_extension.load(
        name="fastood_dev", sources=sources, build_directory=build_dir, is_python_module=False,
        extra_cflags=flags + ["-march=native", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"], extra_cuda_cflags=flags, extra_include_paths=includes,
        with_cuda=with_cuda, verbose=True)
    print(os.path.join(build_dir, "fastood_dev.so"))


if __name__ == "__main__":
    main(sys.argv[1:])
