#!/usr/bin/env bash
# One command for a GPU session (make gpu-check): build fastood for the visible GPU, run the CUDA tests,
# compute-sanitizer (memcheck, racecheck, synccheck) on a short subset, and the CUDA benchmarks; writes
# OUTDIR/gpu-check.json and OUTDIR/gpu-check.md (one JSON, one table) plus per-step logs in OUTDIR/logs.
#
#   scripts/gpu_check.sh [OUTDIR]          (default OUTDIR: gpu-check)
#
# Needs a CUDA toolkit (nvcc; CUDA_HOME or /usr/local/cuda) and a Python with torch >= 2.11 (CUDA build): PYTHON,
# else .venv/bin/python when it imports torch, else python3. pytest and the benchmarks' extras (numpy, mlxtend
# for the pretrained SmallCNN) are used when present; a missing piece fails its step, not the whole run.
# Every step has a time limit and the run stops starting steps at a global deadline (GPU_CHECK_BUDGET_S,
# default 470 s), so the whole check ends within 8 minutes; a step cut short is reported as "timeout".
# Exit status: 0 every step passed; 1 some step failed; 2 no GPU visible (checked first, in seconds).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${1:-${GPU_CHECK_OUT:-gpu-check}}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)

pick_python() {
  if [ -n "${PYTHON:-}" ]; then  # given: trusted (its torch import is checked with the GPU below)
    echo "$PYTHON"
    return 0
  fi
  for candidate in "$ROOT/.venv/bin/python" python3 python; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! PY=$(pick_python); then
  echo "gpu-check: no Python with torch found (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
  exit 2
fi

# 1. Is a GPU visible (to torch: CUDA_VISIBLE_DEVICES counts)? Decided before anything is built or written.
GPU_INFO=$("$PY" - <<'EOF' 2>&1
try:
    import torch
except Exception as exc:
    raise SystemExit(f"NONE torch cannot be imported: {exc}")
if torch.version.cuda is None:
    print(f"NONE torch {torch.__version__} is a CPU-only build")
elif not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    print(f"NONE torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
else:
    major, minor = torch.cuda.get_device_capability(0)
    print(f"GPU {major}.{minor} {torch.cuda.get_device_name(0)}")
EOF
)
case "$GPU_INFO" in
  GPU*) ;;
  *)
    echo "gpu-check: no GPU visible: ${GPU_INFO#NONE }. Nothing to check; run this on a machine with an NVIDIA GPU." >&2
    exit 2 ;;
esac
ARCH=$(echo "$GPU_INFO" | awk '{print $2}')
GPU_NAME=$(echo "$GPU_INFO" | cut -d' ' -f3-)

mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
STEPS="$OUT/steps.tsv"
: > "$STEPS"
FAILED=0
export CUDA_HOME=${CUDA_HOME:-$([ -d /usr/local/cuda ] && echo /usr/local/cuda)}
[ -n "$CUDA_HOME" ] && export PATH="$CUDA_HOME/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
echo "gpu-check: $GPU_NAME (sm_${ARCH/./}), python $PY, CUDA_HOME=${CUDA_HOME:-unset}, output in $OUT"

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in logs/NAME.log, within LIMIT_S and the deadline.
step() {
  local name=$1 limit=$2
  shift 2
  local now left status rc t0 t1
  now=$(date +%s)
  left=$((BUDGET - (now - START)))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped\t-\t0\tout of time\n' "$name" >> "$STEPS"
    echo "gpu-check: [$name] skipped: out of time"
    FAILED=1
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu-check: [$name] (limit ${limit}s) $*"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  if [ $rc -eq 0 ]; then status=passed; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout; else status=failed; fi
  [ $rc -ne 0 ] && FAILED=1
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$*" >> "$STEPS"
  echo "gpu-check: [$name] $status (rc $rc, ${secs}s)"
  tail -n 3 "$OUT/logs/$name.log" | sed 's/^/    /'
  return $rc
}

# 2. Build for this GPU (sm_XY, plus PTX of it for newer GPUs).
BUILT=0
if step build 200 env FASTOOD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH+PTX" MAX_JOBS="$(nproc)" \
    "$PY" setup.py build_ext --inplace; then
  BUILT=1
fi

have_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

if [ $BUILT -eq 1 ]; then
  # 3. The CUDA cases of the op and sampler tests.
  if have_module pytest; then
    step cuda-tests 90 "$PY" -m pytest -q -rfE -p no:cacheprovider --continue-on-collection-errors -k cuda \
      tests/test_op_softmax_entropy.py tests/test_op_modified_energy.py tests/test_op_langevin_step.py \
      tests/test_op_nullspace_project.py tests/test_backend.py tests/test_langevin_sampler.py
  else
    printf 'cuda-tests\tskipped\t-\t0\tpytest is not installed for %s\n' "$PY" >> "$STEPS"
    FAILED=1
  fi

  # 4. compute-sanitizer on a short run of every kernel path (only fastood's kernels are instrumented when the
  #    sanitizer can filter by kernel name).
  SAN=$(command -v compute-sanitizer || { [ -n "$CUDA_HOME" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] && echo "$CUDA_HOME/bin/compute-sanitizer"; })
  if [ -n "$SAN" ]; then
    FILTER=()
    "$SAN" --help 2>&1 | grep -q -- "--kernel-name" && FILTER=(--kernel-name kns=fastood)
    for tool in memcheck racecheck synccheck; do
      step "sanitizer-$tool" 45 "$SAN" --tool "$tool" --error-exitcode 99 ${FILTER[@]+"${FILTER[@]}"} \
        "$PY" scripts/gpu_sanitize_subset.py
    done
  else
    printf 'sanitizer\tskipped\t-\t0\tcompute-sanitizer not found (PATH, CUDA_HOME/bin)\n' >> "$STEPS"
    FAILED=1
  fi

  # 5. Benchmarks.
  step bench-ops 45 "$PY" bench/bench_ops.py --device cuda --no-compile --min-time 0.2 --json "$OUT/bench-ops.json"
  # bench_sampler: resnet18_cifar, 10 steps, the equal-steps and early-stop rows. With --grid (issue 22): one
  # process, one native row per precision (fp32, bf16, fp16) x CUDA graphs on/off x channels_last on/off (the
  # precision column says what ran); else fp32 and bf16 with CUDA graphs on and off in channels_last, where the script has
  # those switches (else its default rows, which include the channels_last + bf16 + CUDA-graph implementation).
  SAMPLER_HELP=$("$PY" bench/bench_sampler.py --help 2>/dev/null)
  SAMPLER=("$PY" bench/bench_sampler.py --device cuda --models resnet18_cifar --steps 10 --min-time 1 --repeats 2)
  if grep -q -- "--grid" <<<"$SAMPLER_HELP"; then
    step bench-sampler-grid 150 "${SAMPLER[@]}" --grid --precisions fp32 bf16 fp16 \
      --json "$OUT/bench-sampler-grid.json"
  elif grep -q -- "--dtype" <<<"$SAMPLER_HELP" && grep -q -- "--cuda-graphs" <<<"$SAMPLER_HELP" \
      && grep -q -- "--channels-last" <<<"$SAMPLER_HELP"; then
    for variant in "bf16 on" "fp32 off" "bf16 off" "fp32 on"; do  # the most telling first, in case time runs out
      set -- $variant
      step "bench-sampler-$1-graphs-$2" 50 "${SAMPLER[@]}" --dtype "$1" --cuda-graphs "$2" --channels-last \
        --json "$OUT/bench-sampler-$1-graphs-$2.json"
    done
  else
    step bench-sampler 120 "${SAMPLER[@]}" --json "$OUT/bench-sampler.json"
  fi
  # sign(grad) of bf16/fp16 (tensor cores) against float32 along FIG sampler runs on the trained SmallCNN
  [ -f bench/sign_agreement.py ] && step sign-agreement 45 "$PY" bench/sign_agreement.py --device cuda \
    --chains 512 --seeds 2 --json "$OUT/bench-sign-agreement.json"
  step bench-nullspace 40 "$PY" bench/bench_nullspace.py --device cuda --json "$OUT/bench-nullspace.json"
fi

# 6. One JSON and one table.
"$PY" scripts/gpu_check_report.py "$OUT" --gpu "$GPU_NAME" --arch "$ARCH" --seconds "$(( $(date +%s) - START ))"
echo "gpu-check: done in $(( $(date +%s) - START ))s: $OUT/gpu-check.json, $OUT/gpu-check.md"
exit $FAILED
