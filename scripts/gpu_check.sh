#!/usr/bin/env bash
# The GPU check, in stages ordered by value, each one device-tool command that stops itself at its budget and
# still writes its results. A task's device time is 15 minutes in all (the machine's start, 1-2 minutes, and
# every call included; at most 10 minutes a call), so the plan is held against 12 minutes by default:
#
#   bash scripts/gpu_check.sh --list [--budget-min 12]   the stages in order, their budgets against the budget,
#                                                         the exact commands; stages past it are listed apart
#   bash scripts/gpu_check.sh STAGE [STAGE...]            run stages in order (each writes a few files under $DEST)
#   bash scripts/gpu_check.sh all [--budget-min 12]       every stage that fits the budget, in order
#   bash scripts/gpu_check.sh --rehearse STAGE            a stage's test selection here, on the CPU, with the
#                                                         peer packages hidden, as the GPU image lacks them (CI)
#   bash scripts/gpu_check.sh --dry-run STAGE             print what a stage would run and check it is well formed
#
# First the build and `vqkernels selftest --device cuda --json`: a verdict on every kernel on the GPU within the
# first few minutes. Then the test files selftest cannot replace (streams, graphs, 2^31 indexing, TF32, the gate
# and SDPA on a real GPU), compute-sanitizer's memcheck, then the benchmarks in order of what they decide
# (attention: whether our kernels or SDPA go first on CUDA; search: the small-N Triton-first threshold; decode).
# Results go to $OUT when it is set (the device tool's folder), else benchmarks/results/gpu-<date>/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ -z "${VQK_GPU:-}" ] && PY=.venv/bin/python

# ---------------------------------------------------------------------------------------------------------
# The stages, most valuable first. name | budget (s) | what. Test stages list their test files; bench stages
# their arguments to benchmarks/run.py.
STAGES=(selftest tests-gpu sanitize bench-attention bench-search bench-decode tests-kernels sanitize-race bench-models)
BUDGET_MIN=12

stage_budget() {
  case "$1" in
    # The first six sum to 12 minutes (a 15-minute allowance less the machine's start and the calls' overhead);
    # the last three are listed past the budget, for a longer lease.
    selftest) echo 270 ;; tests-gpu) echo 150 ;; sanitize) echo 90 ;;
    bench-attention) echo 120 ;; bench-search) echo 60 ;; bench-decode) echo 30 ;;
    tests-kernels) echo 300 ;; sanitize-race) echo 150 ;; bench-models) echo 180 ;;
    *) return 1 ;;
  esac
}

stage_what() {
  case "$1" in
    selftest) echo "build _C with the CUDA kernels (fails loudly), vqkernels info, vqkernels selftest --device cuda --json: every op x backend x dtype against the reference" ;;
    tests-gpu) echo "what selftest cannot replace: streams, CUDA graphs, 2^31 indexing, TF32, the self-check gate and SDPA fallback on a real GPU" ;;
    sanitize) echo "compute-sanitizer memcheck over small shapes of every CUDA and Triton kernel" ;;
    bench-attention) echo "attention fwd and fwd+bwd (causal), bf16: ours vs SDPA's flash, efficient, cuDNN (decides cuda/triton before sdpa)" ;;
    bench-search) echo "nearest_code, GPU sizes (decides the small-N Triton-first threshold)" ;;
    bench-decode) echo "cached decoding vs SDPA over a preallocated cache with a mask: tokens/s, GB/s" ;;
    tests-kernels) echo "the kernel test files on the GPU (every shape and option the tests have; selftest covers the edges)" ;;
    sanitize-race) echo "compute-sanitizer racecheck and synccheck over the same small shapes" ;;
    bench-models) echo "VQGAN training step, GPT sampling (eager and as a CUDA graph) and training step vs taming / HF generate" ;;
  esac
}

# Test files per test stage (a file that does not exist yet is reported, not an error).
stage_tests() {
  case "$1" in
    tests-gpu) echo "tests/test_gpu_only.py tests/test_selftest.py tests/test_backend.py" ;;
    tests-kernels) echo "tests/test_nearest_code.py tests/test_vq_loss.py tests/test_attention.py tests/test_attention_triton.py tests/test_nn_quantizer.py tests/test_nn_attention.py tests/test_lfq.py tests/test_lfq_entropy_cuda.py" ;;
    *) echo "" ;;
  esac
}

# Arguments of `python benchmarks/run.py` per bench stage, GPU sizes; the runner's per-provider timeout is
# inside the stage's budget, and the stage interrupts it (SIGINT) at the budget.
stage_bench_args() {
  case "$1" in
    bench-attention) echo "--ops attention --device cuda --modes fwd-causal fwdbwd-causal --providers cuda triton sdpa-flash sdpa-efficient sdpa-cudnn --repeats 5 --timeout 60" ;;
    bench-search) echo "--ops nearest_code --device cuda --repeats 5 --timeout 30" ;;
    bench-decode) echo "--ops attention --device cuda --modes decode --repeats 5 --timeout 20" ;;
    bench-models) echo "--ops models --device cuda --repeats 3 --timeout 150" ;;
    *) echo "" ;;
  esac
}

# The stages that fit $1 minutes, in order (a stage that does not fit ends the plan: the order is the value).
planned_stages() {
  local budget=$(( $1 * 60 )) total=0 s b
  for s in "${STAGES[@]}"; do
    b=$(stage_budget "$s"); total=$((total + b))
    [ "$total" -le "$budget" ] || break
    echo "$s"
  done
}

list_stages() {
  local total=0 s b in_plan
  in_plan=" $(planned_stages "$BUDGET_MIN" | tr '\n' ' ') "
  echo "GPU check against a ${BUDGET_MIN}-minute budget (a 15-minute device allowance less the machine's start):"
  echo "one device-tool command per stage, from the repository root, \$OUT set by the tool; each stops itself at its budget."
  echo "Carry: .whl (the peers' wheelhouse, see scripts/gpu_wheelhouse.sh) for the bench stages."
  for s in "${STAGES[@]}"; do
    b=$(stage_budget "$s")
    if [[ "$in_plan" == *" $s "* ]]; then
      total=$((total + b))
      printf '%-16s %4ss  (by %4s min)  %s\n' "$s" "$b" "$(awk "BEGIN { print $total / 60 }")" "$(stage_what "$s")"
      printf '    command: VQK_GPU=1 bash scripts/gpu_check.sh %s\n' "$s"
    fi
  done
  echo "sum of planned budgets: ${total}s of ${BUDGET_MIN} min"
  echo "past the budget (a longer lease):"
  for s in "${STAGES[@]}"; do
    [[ "$in_plan" == *" $s "* ]] && continue
    printf '%-16s %4ss  %s\n' "$s" "$(stage_budget "$s")" "$(stage_what "$s")"
    printf '    command: VQK_GPU=1 bash scripts/gpu_check.sh %s\n' "$s"
  done
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
  local t_end=$((SECONDS + budget))
  [ "$per" -lt 60 ] && per=60
  echo "{" > "$json"
  local first=1
  for f in "${files[@]}"; do
    if [ ! -f "$f" ]; then echo "-- $f: not in this checkout (skipped)"; continue; fi
    local left=$((t_end - SECONDS))
    [ "$per" -gt "$left" ] && per=$left
    if [ "$per" -lt 10 ]; then echo "-- $f: the stage's budget is spent (not run)"; rc_all=1; continue; fi
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
    local t0=$SECONDS
    case "$s" in
      selftest)
        ensure_built || exit 1
        $PY -m vqkernels info
        # SIGINT at the budget: selftest then prints what it has (its JSON says "interrupted")
        timeout -s INT -k 15 $((budget - (SECONDS - t0) - 20)) \
          $PY -m vqkernels.selftest --device cuda --json > "$DEST/selftest.json"
        local rc=$?
        $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print('selftest:', d['summary'], 'in', d['seconds'], 's');
[print(r['op'], r['backend'], r['device'], r['dtype'], r['status'].upper(), r['detail'][:300]) for r in d['results'] if r['status'] == 'failed']" "$DEST/selftest.json"
        exit $rc ;;
      tests-*)
        ensure_built || exit 1
        peer_wheels
        # shellcheck disable=SC2046
        run_tests "$s" $((budget - (SECONDS - t0))) $(stage_tests "$s") ;;
      sanitize|sanitize-race)
        ensure_built || exit 1
        if ! command -v compute-sanitizer >/dev/null; then
          for d in /usr/local/cuda/bin /opt/nvidia/*/bin; do [ -x "$d/compute-sanitizer" ] && PATH=$d:$PATH; done
        fi
        command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; exit 1; }
        local rc=0 tools=(memcheck) tool
        [ "$s" = sanitize-race ] && tools=(racecheck synccheck)
        local left=$((budget - (SECONDS - t0) - 5))
        for tool in "${tools[@]}"; do
          echo "== compute-sanitizer --tool $tool"
          timeout -k 10 $(( left / ${#tools[@]} )) compute-sanitizer --tool "$tool" --error-exitcode 86 \
            $PY scripts/gpu_sanitize_cases.py --json "$DEST/sanitize-$tool.json" || rc=1
        done
        exit $rc ;;
      bench-*)
        ensure_built || exit 1
        peer_wheels
        # (the self-check ran in the selftest stage; the benchmarks time the kernels, not the check)
        # shellcheck disable=SC2046
        VQKERNELS_SELFCHECK=never timeout -s INT -k 15 $((budget - (SECONDS - t0))) \
          $PY benchmarks/run.py $(stage_bench_args "$s") --out "$DEST" ;;
    esac
  } 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "stage $s rc=$rc; results in $DEST" | tee -a "$log"
  return "$rc"
}

# What marks a test file as touching a peer: importing one (directly or with importorskip), or the benchmark
# suites (whose providers are the peers).
PEER_USE="(importorskip|import_module)\\([\"'](taming|vector_quantize_pytorch|faiss|transformers|lpips|pytorch_lightning)|^\\s*(import|from) (taming|vector_quantize_pytorch|faiss|transformers|lpips)|benchmarks\\.(harness|suites|peers)|from \\.\\. import peers"

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
    echo "  python benchmarks/run.py $a --out \$DEST"
    # shellcheck disable=SC2086
    # (this checkout's package, not whichever one the interpreter has installed)
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" $PY benchmarks/run.py $a --list >/dev/null \
      || { echo "  bench arguments do not parse"; missing=1; }
  fi
  [ "$s" = selftest ] && echo "  python -m vqkernels.selftest --device cuda --json > \$DEST/selftest.json"
  [ "${s#sanitize}" != "$s" ] && { [ -f scripts/gpu_sanitize_cases.py ] || { echo "  scripts/gpu_sanitize_cases.py missing"; missing=1; }; }
  return $missing
}

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-min) BUDGET_MIN=${2:?--budget-min needs minutes}; shift 2 ;;
    --budget-min=*) BUDGET_MIN=${1#*=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[[ "$BUDGET_MIN" =~ ^[0-9]+$ ]] || { echo "--budget-min takes whole minutes, got '$BUDGET_MIN'"; exit 2; }
set -- "${ARGS[@]+"${ARGS[@]}"}"

case "${1:-}" in
  ""|-h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' ;;
  --list) list_stages ;;
  --rehearse) shift; rc=0; for s in "$@"; do DEST=${OUT:-$(mktemp -d)} rehearse "$s" || rc=1; done; exit $rc ;;
  --dry-run) shift; rc=0; for s in "$@"; do dry_run "$s" || rc=1; done; exit $rc ;;
  all) rc=0; for s in $(planned_stages "$BUDGET_MIN"); do run_stage "$s" || rc=1; done; exit $rc ;;
  *) rc=0; for s in "$@"; do run_stage "$s" || rc=1; done; exit $rc ;;
esac
