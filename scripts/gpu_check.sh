#!/usr/bin/env bash
# One command for a GPU machine (no network, its own torch): build vqkernels._C with the CUDA kernels,
# run the tests on the GPU (Triton compiled for the device, the cuda backend live), then the benchmarks.
# Writes everything under ${OUT:-benchmarks/results}/gpu-<date>/ ; commit what it printed.
#   bash scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M%S)
DEST=${OUT:-benchmarks/results}/gpu-$STAMP
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} VQKERNELS_REQUIRE_EXT=1
unset TRITON_INTERPRET
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda

{
  echo "== device"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  echo "== build"; time $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1
  $PY -m vqkernels info
} 2>&1 | tee "$DEST/build.log"

echo "== tests" | tee "$DEST/tests.log"
$PY -m pytest -q -x --timeout=600 -p no:cacheprovider tests 2>&1 | tee -a "$DEST/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks" | tee "$DEST/bench.log"
$PY -m vqkernels bench --out "$DEST" "$@" 2>&1 | tee -a "$DEST/bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc; results in $DEST"
exit $(( tests_rc != 0 || bench_rc != 0 ))
