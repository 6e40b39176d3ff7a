#!/usr/bin/env bash
# The GPU check, in stages that each fit one 10-minute command of a short GPU lease (an H100 for about
# 30 minutes, bare, no network, at most 8 files back per command).
#
#   bash scripts/gpu_check.sh --list             the stages, their time budgets and the exact commands
#   bash scripts/gpu_check.sh STAGE [STAGE...]   run stages in order (each writes <= 8 files under $DEST)
#   bash scripts/gpu_check.sh --rehearse STAGE   run a stage's test selection here, on the CPU, with the
#                                                peer packages hidden, as the GPU image lacks them (CI)
#   bash scripts/gpu_check.sh --dry-run STAGE    print what a stage would run and check it is well formed
#
# Results go to $OUT when it is set (the device tool's folder), else benchmarks/results/gpu-<date>/.
# Each stage: one log, a summary JSON, and its CSV/JSON results; test files run one per process (a crash
# or an illegal address in one cannot hide the others) and a failure never stops the stage early.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -z "${VQK_GPU:-}" ] && PY=.venv/bin/python

# ---------------------------------------------------------------------------------------------------------
# The stages. name | budget (s) | what. Test stages list their test files; bench stages their bench args.
STAGES=(build tests-search tests-attention sanitize bench-search bench-attention bench-decode bench-models)

stage_budget() {
  case "$1" in
    # Budgets sum to 27.5 minutes: a 30-minute lease less the machine's start. Each stage stops itself there.
    build) echo 240 ;; tests-search) echo 255 ;; tests-attention) echo 255 ;; sanitize) echo 180 ;;
    bench-search) echo 180 ;; bench-attention) echo 240 ;; bench-decode) echo 120 ;; bench-models) echo 180 ;;
    *) return 1 ;;
  esac
}

stage_what() {
  case "$1" in
    build) echo "build _C with the CUDA kernels (fails loudly), vqkernels info, build/registration/sm_90 tests" ;;
    tests-search) echo "nearest_code, vq_loss, code stats, quantizer modules, GPU-only cases (streams, graphs, 2^31, TF32)" ;;
    tests-attention) echo "attention ops (Triton + CUDA fwd/bwd/decode), nn attention, models on the GPU" ;;
    sanitize) echo "compute-sanitizer memcheck, racecheck, synccheck over small shapes of every CUDA and Triton kernel" ;;
    bench-search) echo "nearest_code and quantizer benchmarks (GPU sizes), peers from the carried wheelhouse" ;;
    bench-attention) echo "attention fwd and fwd+bwd (causal), bf16, Dh 64/128, T 256-8192: ours vs SDPA's flash, efficient, cuDNN backends" ;;
    bench-decode) echo "cached decoding (flash-decoding) vs SDPA over a preallocated cache with a mask: tokens/s, GB/s" ;;
    bench-models) echo "VQGAN training step, GPT sampling (eager and as a CUDA graph) and training step vs taming / HF generate" ;;
  esac
}

# Test files per test stage (globs; a file that does not exist yet is reported, not an error).
stage_tests() {
  case "$1" in
    build) echo "tests/test_build.py tests/test_cuda_build.py tests/test_backend.py tests/test_triton_sm90.py" ;;
    tests-search) echo "tests/test_nearest_code.py tests/test_vq_loss.py tests/test_nn_quantizer.py tests/test_gpu_only.py tests/test_bench.py" ;;
    tests-attention) echo "tests/test_attention.py tests/test_attention_triton.py tests/test_nn_attention.py tests/test_models_vqgan.py tests/test_models_gpt.py" ;;
    *) echo "" ;;
  esac
}

# Benchmark arguments per bench stage (vqkernels bench ...), GPU sizes, each well inside the budget.
stage_bench_args() {
  case "$1" in
    bench-search) echo "--ops nearest_code quantizer --device cuda --repeats 5 --timeout 120" ;;
    # The math backend and minGPT's explicit mask are orders of magnitude slower at long T: left to a longer lease.
    bench-attention) echo "--ops attention --device cuda --modes fwd-causal fwdbwd-causal --providers cuda triton sdpa-flash sdpa-efficient sdpa-cudnn flash-attn --repeats 5 --timeout 120" ;;
    bench-decode) echo "--ops attention --device cuda --modes decode --repeats 5 --timeout 60" ;;
    bench-models) echo "--ops models --device cuda --repeats 3 --timeout 150" ;;
    *) echo "" ;;
  esac
}

list_stages() {
  local total=0
  echo "GPU check: ${#STAGES[@]} stages, one device-tool command each (run from the repository root; \$OUT set by the tool)."
  echo "Carry: .whl (the peers' wheelhouse, see scripts/gpu_wheelhouse.sh) for the bench stages."
  for s in "${STAGES[@]}"; do
    local b; b=$(stage_budget "$s"); total=$((total + b))
    printf '%-16s %4ss  %s\n' "$s" "$b" "$(stage_what "$s")"
    printf '    command: VQK_GPU=1 bash scripts/gpu_check.sh %s\n' "$s"
  done
  echo "sum of budgets: ${total}s ($((total / 60)) min) of a 30-minute lease; machine start ~1-2 min; each stage stops itself at its budget"
}

DEST=${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}

peer_wheels() {
  # The peers' wheels (scripts/gpu_wheelhouse.sh downloads them here), installed beside the project.
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vqk-peers .whl/*.whl \
      && export PYTHONPATH=/tmp/vqk-peers${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "no .whl wheelhouse carried: peer providers (taming, vector-quantize-pytorch, faiss) will be skipped"
  fi
}

ensure_built() {
  # Build once per machine (ignored build outputs stay between calls on a warm machine). Fails loudly.
  if ! $PY -c "import vqkernels, sys; sys.exit(0 if vqkernels.info()['_C'] and vqkernels.info()['_C'].get('cuda') else 1)" 2>/dev/null; then
    echo "== build (pip install --no-build-isolation --no-deps -e .)"
    MAX_JOBS=${MAX_JOBS:-16} VQKERNELS_REQUIRE_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps -e . || {
      echo "BUILD FAILED"; return 1; }
  fi
}

# Runs each test file in its own process with a per-file time limit; never stops at a failure.
# Writes $DEST/<stage>-tests.json: {file: {rc, summary, seconds}}.
run_tests() {
  local stage=$1 budget=$2; shift 2
  local files=("$@") per=$(( budget / ( ${#files[@]} > 0 ? ${#files[@]} : 1 ) )) json="$DEST/$stage-tests.json" rc_all=0
  [ "$per" -lt 60 ] && per=60
  echo "{" > "$json"
  local first=1
  for f in "${files[@]}"; do
    if [ ! -f "$f" ]; then echo "-- $f: not in this checkout (skipped)"; continue; fi
    echo "== $f (limit ${per}s)"
    local t0=$SECONDS out rc
    out=$(timeout -k 10 "$per" $PY -m pytest -q -p no:cacheprovider ${PYTEST_EXTRA:-} "$f" 2>&1); rc=$?
    echo "$out" | tail -n 40
    # pytest exit 5 = nothing collected/all deselected: not a failure of the harness.
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && rc_all=1
    local summary; summary=$(echo "$out" | grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran|passed|failed' | tail -n 1 | tr -d '"=')
    [ $first -eq 0 ] && echo "," >> "$json"; first=0
    printf '  "%s": {"rc": %d, "seconds": %d, "summary": "%s"}' "$f" "$rc" $((SECONDS - t0)) "${summary# }" >> "$json"
  done
  echo "" >> "$json"; echo "}" >> "$json"
  return $rc_all
}

run_stage() {
  local s=$1 budget; budget=$(stage_budget "$s") || { echo "unknown stage '$s' (stages: ${STAGES[*]})"; return 2; }
  mkdir -p "$DEST"
  local log="$DEST/$s.log"
  {
    echo "== stage $s: $(stage_what "$s")"
    echo "== $(date -u +%FT%TZ) git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    unset TRITON_INTERPRET
    [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
    ensure_built || exit 1
    case "$s" in
      build)
        $PY -m vqkernels info
        # shellcheck disable=SC2046
        run_tests "$s" $((budget - 150)) $(stage_tests "$s") ;;
      tests-*)
        peer_wheels
        # shellcheck disable=SC2046
        run_tests "$s" "$budget" $(stage_tests "$s") ;;
      sanitize)
        if ! command -v compute-sanitizer >/dev/null; then
          for d in /usr/local/cuda/bin /opt/nvidia/*/bin; do [ -x "$d/compute-sanitizer" ] && PATH=$d:$PATH; done
        fi
        command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; exit 1; }
        local rc=0
        for tool in memcheck racecheck synccheck; do
          echo "== compute-sanitizer --tool $tool"
          timeout -k 10 $(( budget / 3 )) compute-sanitizer --tool "$tool" --error-exitcode 86 \
            $PY scripts/gpu_sanitize_cases.py --json "$DEST/sanitize-$tool.json" || rc=1
        done
        exit $rc ;;
      bench-*)
        peer_wheels
        # shellcheck disable=SC2046
        timeout -k 10 "$budget" $PY -m vqkernels bench $(stage_bench_args "$s") --out "$DEST" ;;
    esac
  } 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "stage $s rc=$rc; results in $DEST" | tee -a "$log"
  return "$rc"
}

# What marks a test file as touching a peer: importing one (directly or with importorskip), or the benchmark
# suites (whose providers are the peers).
PEER_USE="(importorskip|import_module)\\([\"'](taming|vector_quantize_pytorch|faiss|transformers|lpips|pytorch_lightning)|^\\s*(import|from) (taming|vector_quantize_pytorch|faiss|transformers|lpips)|vqkernels\\.bench|_taming_standins"

# The CPU rehearsal (CI): a stage's test selection, each file in its own process, with the peer packages
# hidden (tests/plugins/hide_peers.py), as on the GPU image. Files that never import a peer run the same
# with or without them and already ran in `make test`, so only files that name a peer run again here.
rehearse() {
  local s=$1 files=() f
  stage_budget "$s" >/dev/null || { echo "unknown stage '$s' (stages: ${STAGES[*]})"; return 2; }
  for f in $(stage_tests "$s"); do
    [ -f "$f" ] || continue
    if grep -qE "$PEER_USE" "$f"; then files+=("$f"); fi
  done
  echo "rehearsal of stage $s without the peers: ${files[*]:-(no file names a peer)}"
  [ ${#files[@]} -eq 0 ] && return 0
  DEST=${DEST:-$(mktemp -d)}
  mkdir -p "$DEST"
  PYTHONPATH="$ROOT/tests/plugins${PYTHONPATH:+:$PYTHONPATH}" PYTEST_EXTRA="-p hide_peers" \
    run_tests "rehearse-$s" 900 "${files[@]}"
}

dry_run() {
  local s=$1
  stage_budget "$s" >/dev/null || { echo "unknown stage '$s'"; return 2; }
  echo "stage $s ($(stage_budget "$s")s): $(stage_what "$s")"
  local f missing=0
  for f in $(stage_tests "$s"); do
    if [ -f "$f" ]; then echo "  test file $f"; else echo "  test file $f (not in this checkout)"; fi
  done
  local a; a=$(stage_bench_args "$s")
  if [ -n "$a" ]; then
    echo "  vqkernels bench $a --out \$DEST"
    # shellcheck disable=SC2086
    $PY -m vqkernels bench $a --list >/dev/null || { echo "  bench arguments do not parse"; missing=1; }
  fi
  [ "$s" = sanitize ] && { [ -f scripts/gpu_sanitize_cases.py ] || { echo "  scripts/gpu_sanitize_cases.py missing"; missing=1; }; }
  return $missing
}

case "${1:-}" in
  ""|-h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
  --list) list_stages ;;
  --rehearse) shift; rc=0; for s in "$@"; do DEST=${OUT:-$(mktemp -d)} rehearse "$s" || rc=1; done; exit $rc ;;
  --dry-run) shift; rc=0; for s in "$@"; do dry_run "$s" || rc=1; done; exit $rc ;;
  all) rc=0; for s in "${STAGES[@]}"; do run_stage "$s" || rc=1; done; exit $rc ;;
  *) rc=0; for s in "$@"; do run_stage "$s" || rc=1; done; exit $rc ;;
esac
