#!/usr/bin/env bash
# The release path, end to end (issue 21): build the sdist without torch, install it into a fresh virtualenv with
# --no-build-isolation (compiling the extension from the sdist's files alone, outside this checkout), and check that
# the installed fastood imports its native extension and recorded the torch it was built against.
#
#   bash scripts/check_sdist_install.sh          # PYTHON (default .venv/bin/python) gives torch and the build tools
#   FASTOOD_CUDA=0 bash scripts/check_sdist_install.sh   # CPU-only extension: a few minutes instead of a CUDA build
#
# The fresh venv sees $PYTHON's packages (torch, setuptools, ninja, pybind11, pip) through a .pth file instead of
# downloading them, so the check runs offline; fastood itself is installed into the fresh venv (--no-deps) and
# imported from outside this checkout. Exit status 0 and "sdist install: OK" when everything holds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v "$PYTHON")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastood-sdist.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

# 1. The sdist, from a copy of the tracked (and new, not ignored) files so nothing built here leaks in; torch is
#    blocked to prove packing the sources does not need it.
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
        | (cd "$ROOT" && xargs -0 cp --parents -t "$WORK/src" 2>/dev/null) || true
else
    cp -r "$ROOT/." "$WORK/src"
fi
(cd "$WORK/src" && "$PYTHON" -c "
import sys
sys.modules['torch'] = None  # import torch raises: the sdist must not need it
from setuptools import build_meta
print(build_meta.build_sdist(sys.argv[1]))" "$WORK/dist") >"$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/fastood-*.tar.gz)
echo "sdist: $(basename "$SDIST") ($(tar tzf "$SDIST" | wc -l) entries, $(( $(date +%s) - start )) s)"

# 2. A fresh venv that sees $PYTHON's site-packages (torch, build tools) after its own.
"$PYTHON" -m venv --without-pip "$WORK/venv"
VPY="$WORK/venv/bin/python"
PURELIB=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$PURELIB/_fastood_check_host.pth"
export PATH="$WORK/venv/bin:$(dirname "$PYTHON"):$PATH"   # ninja

# 3. Install the sdist against that torch, outside the checkout.
cd "$WORK"
build_start=$(date +%s)
FASTOOD_BUILD_LOG="$WORK/build.log" "$VPY" -m pip install --no-build-isolation --no-deps --no-cache-dir "$SDIST" \
    >"$WORK/pip.log" 2>&1 || { tail -n 60 "$WORK/pip.log"; exit 1; }
echo "pip install --no-build-isolation: $(( $(date +%s) - build_start )) s"

# 4. The installed package loads its extension, built against this torch.
"$VPY" - "$WORK/venv" <<'PY'
import sys, warnings
warnings.simplefilter("error")  # a load failure or a build-mismatch warning fails the check
import torch
import fastood
import fastood.ops as ops
info = ops.build_info()
print("installed:", fastood.__file__)
print("build_info:", info)
assert fastood.__file__.startswith(sys.argv[1]), f"fastood imported from {fastood.__file__}, not the fresh venv"
assert info["native"], f"native extension not loaded: {info['error']}"
assert info["built_torch"] == torch.__version__, info
PY
echo "sdist install: OK ($(( $(date +%s) - start )) s in all)"
