# The two commands of the quick start:
#   make bench   set everything up (venv, torch, build of vqkernels._C) and run `vqkernels bench`
#   make test    set everything up and run the tests
# Everything lives in .venv; nothing is installed outside it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CUDA-enabled torch builds (and links) the CUDA kernels wherever nvcc is found, GPU or not.
TORCH  ?= torch==2.14.1
DEPS   := "setuptools>=64" wheel "numpy<2.4" ninja pybind11 pytest pytest-benchmark faiss-cpu matplotlib \
          taming-transformers-rom1504==0.0.6 vector-quantize-pytorch==1.32.0
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
export MAX_JOBS ?= 2
# A kernel that does not build fails the build here (users' installs fall back to PyTorch instead).
export VQKERNELS_REQUIRE_EXT ?= 1

.PHONY: setup build test bench info clean

$(VENV)/.deps-stamp: Makefile pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" $(DEPS)
	touch $@

setup: $(VENV)/.deps-stamp

# Note: a .cu and a .cpp must not share a stem (their objects would collide).
# Rebuilds _C in place when a C++/CUDA source changed (ninja keeps it incremental).
build: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import vqkernels, sys; d = vqkernels.info(); print('vqkernels._C:', d['_C'] or d['_C_error'])"

test: build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: build
	$(BIN)/vqkernels bench $(BENCH_ARGS)

info: build
	$(BIN)/vqkernels info

clean:
	rm -rf build *.egg-info vqkernels/_C*.so
