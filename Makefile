# fastood developer commands.
#   make setup   fresh machine -> .venv with torch (CUDA build) + dependencies, then the native build
#   make test    Python tests (CPU; CUDA tests run where a GPU is present) + the CMake/ctest C++ test
#   make data    full MNIST + Fashion-MNIST into the data root ($FASTOOD_DATA, else ~/.cache/fastood/data)
#   make build   (re)build fastood._C in place (CUDA kernels when torch has CUDA and a toolkit is found)
#   make bench   kernel benchmark table (bench/bench_ops.py)
#   make gpu-check  on a GPU machine: build for it, CUDA tests, compute-sanitizer, CUDA benchmarks -> gpu-check/
PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch===2.13.0 torchvision==0.28.0
CUDA_HOME ?= $(shell [ -d /usr/local/cuda ] && echo /usr/local/cuda)
export CUDA_HOME
PYTEST_ARGS ?=

.PHONY: setup venv build data test pytest ctest bench gpu-check clean

setup: venv build

venv:
	[ -x $(PY) ] || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23" setuptools wheel
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install numpy scikit-learn tqdm pybind11 ninja pytest expecttest mlxtend matplotlib lightning

build:
	$(PY) setup.py build_ext --inplace
	FASTOOD_NO_EXTENSION=1 $(PY) -m pip install --no-build-isolation --no-deps -e . >/dev/null
	$(PY) -c "import fastood.ops as o; print('fastood build:', o.build_info())"

data:
	$(PY) -m fastood data fetch mnist fashion-mnist

test: pytest ctest

pytest:
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# LibTorch's CMake config looks for the CUDA libraries torch was built with: point it at the toolkit and at the
# pip-installed nvidia/cu13 libraries (nvrtc) beside torch.
NVIDIA_CU13 = $(shell $(PY) -c 'import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], "cu13"))' 2>/dev/null)
CMAKE_CUDA_ARGS = $(if $(CUDA_HOME),-DCUDAToolkit_ROOT=$(CUDA_HOME) -DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc) \
	$(if $(NVIDIA_CU13),-DCUDA_nvrtc_LIBRARY=$(NVIDIA_CU13)/lib/libnvrtc.so.13)

ctest:
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DWITH_CUDA=OFF $(CMAKE_CUDA_ARGS) > build-cmake.log || (cat build-cmake.log; exit 1)
	cmake --build build-cmake -j2
	ctest --test-dir build-cmake --output-on-failure

bench:
	$(PY) bench/bench_ops.py --json bench-ops.json

# Needs no venv: scripts/gpu_check.sh takes $$PYTHON, else .venv/bin/python, else python3 (any with torch).
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf build build-cmake fastood/_C*.so *.egg-info
