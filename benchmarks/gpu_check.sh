#!/usr/bin/env bash
# The first run on a GPU machine, as one command (issue 10; see benchmarks/GPU.md).
#
#   bash benchmarks/gpu_check.sh            # GPU machine: build, tests, sanitizer, benchmarks (< 9 min on an H200)
#   bash benchmarks/gpu_check.sh --dry-run  # CPU machine: the same flow, tiny, through Triton's interpreter
#
# It installs nothing from a package index: it builds the extension in place against the
# installed torch (`pip install --no-build-isolation --no-deps -e .`) for the local GPU's
# architecture only, then runs, each stage time-boxed inside GPU_CHECK_BUDGET_S (default
# 520 s of stages):
#   build      PAMA_EXT_CUDA=1, TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS = cores;
#              prints build_info() and fails loudly if the cuda or triton backend is missing
#   tests      the CUDA backend tests, the non-finite tests and the Triton kernel tests on
#              CUDA tensors (no-host-sync checks included), in parallel with
#   sanitizer  compute-sanitizer memcheck and racecheck on benchmarks/gpu_sanitize_case.py
#              (a clear SKIP line when the sanitizer is missing or refuses the device)
#   bench      pama_loss fwd+bwd at 1M and 16M tokens, N = 2, 4, 8, fp32 and bf16: cuda,
#              triton, eager, torch.compile, next to a device copy of the same bytes; the
#              goal point (16M, N = 4, bf16) first; every N from 1 to 64 at 16M bf16
#   profile    each kernel's device time (torch.profiler) for N = 4, 5, 16, 64, and the Triton
#              launch parameters measured as CUDA-graph replays (benchmarks/gpu_kernel_profile.py)
#   optimizer  PAMA step vs single-objective Noon PPO step on GPT-2 small (124 M parameters)
#   fused_linear  fused_linear_pama_loss vs the unfused path at bf16, B*T 16k, H 4096, V 128k
#              (memory and time; Liger-Kernel's fused GRPO loss for N = 1 where installed)
# GPU_CHECK_ONLY="tests_cuda raise bench_n" reruns a subset (build always runs). It
# writes gpu_check.json (every figure and stage status) and gpu_check_log.txt (all the
# logs) under $OUT when set, else under benchmarks/results/; prints a summary with ratios;
# exits non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (the only option is --dry-run)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
RES=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RES"
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
BUDGET=${GPU_CHECK_BUDGET_S:-520}
RESERVE=15  # seconds kept for the report
START=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1

left() { echo $((BUDGET - (SECONDS - START) - RESERVE)); }

# GPU_CHECK_ONLY="tests_cuda bench" runs only the stages whose names start with one of
# these words (a short rerun after fixes; build and build_info always run)
selected() {
  [ -z "${GPU_CHECK_ONLY:-}" ] && return 0
  case "$1" in build|build_info) return 0 ;; esac
  local w
  for w in $GPU_CHECK_ONLY; do
    case "$1" in "$w"*) return 0 ;; esac
  done
  return 1
}

# stage NAME CAP_S COMMAND...: run COMMAND with its output in $LOGS/NAME.log, time-boxed to
# min(CAP_S, what the budget has left); one line "NAME<TAB>status<TAB>rc<TAB>seconds" in
# $LOGS/stages.tsv (status: ok, FAIL, TIMEOUT, SKIP)
stage() {
  local name=$1 cap=$2; shift 2
  if ! selected "$name"; then
    printf '%s\tSKIP\t-\t0\tnot in GPU_CHECK_ONLY\n' "$name" >>"$LOGS/stages.tsv"
    return 0
  fi
  local avail; avail=$(left)
  if [ "$avail" -lt 20 ]; then
    printf '%s\tSKIP\t-\t0\tbudget spent\n' "$name" >>"$LOGS/stages.tsv"
    echo "[gpu_check] $name: SKIP (budget of ${BUDGET}s spent)"
    return 0
  fi
  local limit=$(( cap < avail ? cap : avail )) t0=$SECONDS rc status
  echo "[gpu_check] $name: start (limit ${limit}s, $(( SECONDS - START ))s elapsed)"
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$status" "$rc" "$(( SECONDS - t0 ))" >>"$LOGS/stages.tsv"
  echo "[gpu_check] $name: $status (rc $rc, $(( SECONDS - t0 ))s)"
  if [ "$status" != ok ]; then tail -n 25 "$LOGS/$name.log" | sed "s/^/[$name] /"; fi
  return 0
}

skip() {  # skip NAME WHY: a stage that cannot run here, said plainly
  printf '%s\tSKIP\t-\t0\t%s\n' "$1" "$2" >>"$LOGS/stages.tsv"
  echo "[gpu_check] $1: SKIP ($2)"
}

# ------------------------------------------------------------------ environment
{
  echo "date: $(date -u +%FT%TZ)"; echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  command -v nvcc && nvcc --version
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
} >"$LOGS/env.log" 2>&1
cat "$LOGS/env.log" | grep -E "^(python|triton|date|git)" | sed 's/^/[gpu_check] /'

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device here; on a CPU machine run 'bash benchmarks/gpu_check.sh --dry-run'" >&2
  exit 2
fi

# ------------------------------------------------------------------ build
if [ "$DRY" = 0 ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    # the toolkit root (nvcc may be a wrapper script, which misleads torch's guess)
    CUDA_HOME=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)
    [ -n "$CUDA_HOME" ] && export CUDA_HOME
  fi
  # PIP_BREAK_SYSTEM_PACKAGES: an image's system python may be marked externally managed
  stage build 240 env PAMA_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" PIP_BREAK_SYSTEM_PACKAGES=1 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
else
  echo "[gpu_check] build (dry run): would run PAMA_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=<device cc> MAX_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
  stage build 60 "$PY" -c "import pama_ext._C"
fi
# the backends this build has: fail loudly when the GPU ones are missing
NEED=$([ "$DRY" = 0 ] && echo "cuda triton" || echo "cpp")
stage build_info 60 "$PY" - $NEED <<'EOF'
import json, sys
import pama_ext
info = pama_ext.build_info()
print(json.dumps(info, indent=1, default=str))
# triton registers only where a GPU is visible: ask available_backends() as users do
have = set(info.get("backends", [])) | set(pama_ext.available_backends())
missing = [b for b in sys.argv[1:] if b not in have]
if missing:
    sys.exit(f"gpu_check: backend(s) {missing} missing from this build: build_info()={info}, "
             f"available_backends()={pama_ext.available_backends()}")
EOF
sed -n '1,40p' "$LOGS/build_info.log" | sed 's/^/[build_info] /'

# ------------------------------------------------------------------ tests + sanitizer (in parallel)
COLLECT=$([ "$DRY" = 1 ] && echo "--collect-only" || echo "")
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts= -rs)
# pytest-xdist, where installed, spreads the (compile-heavy) GPU tests over the cores
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then PYTEST+=(-n 6); fi
TESTS_CUDA=(python_tests/test_cuda_backend.py)
[ -f python_tests/test_nonfinite_sequence.py ] && TESTS_CUDA+=(python_tests/test_nonfinite_sequence.py)
[ -f python_tests/test_statistics_op.py ] && TESTS_CUDA+=(python_tests/test_statistics_op.py)
stage tests_cuda 240 "${PYTEST[@]}" $COLLECT "${TESTS_CUDA[@]}" --junitxml="$LOGS/tests_cuda.xml" &
TRITON_DEV=$([ "$DRY" = 1 ] && echo cpu || echo cuda)
stage tests_triton 240 env PAMA_TRITON_TEST_DEVICE=$TRITON_DEV "${PYTEST[@]}" $COLLECT python_tests/triton_interp \
  -o "python_files=interp_*.py" --junitxml="$LOGS/tests_triton.xml" &

sanitize() {  # memcheck + racecheck of the CUDA and Triton kernels, when the sanitizer works here
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" 2>/dev/null | head -n1)
  if [ "$DRY" = 1 ]; then
    stage sanitize_flow 120 "$PY" benchmarks/gpu_sanitize_case.py --backend cpp --device cpu --quick
    skip sanitizer "dry run: no GPU (the workload ran on CPU as sanitize_flow)"
    return
  fi
  local b
  for b in cuda triton; do  # nonfinite="raise": a ValueError naming the argument, never a crash
    stage "raise_paths_$b" 60 "$PY" benchmarks/gpu_sanitize_case.py --backend $b --raise-paths
  done
  # the C++ CPU kernel's raise path in the same (CUDA) build: tells a crash of the CUDA glue
  # from one of every C++ exception in this build
  stage raise_paths_cpp 60 "$PY" benchmarks/gpu_sanitize_case.py --backend cpp --device cpu --raise-paths
  if ! { selected sanitize_plain || selected memcheck || selected racecheck; }; then return; fi
  if [ -z "$cs" ]; then skip sanitizer "compute-sanitizer not found"; return; fi
  # probe: some machines refuse the device ("Device not supported", error 999)
  if ! timeout 60 "$cs" --tool memcheck --error-exitcode 99 "$PY" -c \
      "import torch; x = torch.ones(8, device='cuda'); assert float((x + 1).sum()) == 16.0" >"$LOGS/sanitizer_probe.log" 2>&1; then
    skip sanitizer "compute-sanitizer refuses this device: $(grep -m1 -iE 'error|not supported' "$LOGS/sanitizer_probe.log" | tr '\t' ' ')"
    return
  fi
  for b in cuda triton; do  # plain runs first: the workload's own check, and Triton's cache warmed
    stage "sanitize_plain_$b" 90 "$PY" benchmarks/gpu_sanitize_case.py --backend $b
  done
  for b in cuda triton; do
    stage "memcheck_$b" 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 99 \
      --leak-check no "$PY" benchmarks/gpu_sanitize_case.py --backend $b --quick
  done
  stage racecheck_cuda 100 "$cs" --tool racecheck --error-exitcode 99 "$PY" benchmarks/gpu_sanitize_case.py --backend cuda --quick
}
sanitize &
wait

# ------------------------------------------------------------------ a crash gets a native backtrace
# A segfault shows only Python frames; cuda-gdb (on these machines; it debugs host code
# too) gives the C++ ones. One crashed test (pytest-xdist's "crashed while running") or
# crashed raise-path run is rerun under it.
crash_cmd=()
crashed=$(grep -ho "crashed while running '[^']*'" "$LOGS"/tests_*.log 2>/dev/null | head -n1 | sed "s/.*running '//; s/'\$//")
if [ -n "$crashed" ]; then
  crash_cmd=("$PY" -m pytest -x -q -p no:cacheprovider -p no:xdist -o addopts= "$crashed")
else
  for b in cuda triton cpp; do
    if grep -qs "^raise_paths_$b	FAIL	\(139\|134\|135\)	" "$LOGS/stages.tsv"; then
      crash_cmd=("$PY" benchmarks/gpu_sanitize_case.py --backend $b --device "$([ $b = cpp ] && echo cpu || echo cuda)" --raise-paths)
      break
    fi
  done
fi
if [ ${#crash_cmd[@]} -gt 0 ]; then
  if command -v cuda-gdb >/dev/null; then
    stage crash_backtrace 90 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex "bt 40" --args "${crash_cmd[@]}"
    # the rerun's own status says nothing (gdb exits 0): its log holds the backtrace
    grep -E "^#[0-9]+ " "$LOGS/crash_backtrace.log" | head -n 25 | sed 's/^/[crash_backtrace] /'
  else
    skip crash_backtrace "a crash in ${crash_cmd[*]}, and no cuda-gdb for its backtrace"
  fi
fi

# ------------------------------------------------------------------ benchmarks (alone on the GPU)
if [ "$DRY" = 0 ]; then
  BENCH=("$PY" benchmarks/bench_gpu_loss.py --reps 10 --warmup 3)
  stage bench_goal 150 "${BENCH[@]}" --sizes 16M --ns 4 --dtypes bf16 --impls cuda,triton,eager,compiled --host-overhead \
    --out "$LOGS/bench_goal.json"
  stage bench_n_sweep 120 "${BENCH[@]}" --sizes 16M --ns 1,2,3,4,5,6,7,8,16,64 --dtypes bf16 --impls cuda,triton \
    --out "$LOGS/bench_n_sweep.json"
  stage kernel_profile 120 "$PY" benchmarks/gpu_kernel_profile.py --ns 4,5,16,64 --out "$LOGS/kernel_profile.json"
  # torch.compile recompiles per dtype and marks the shapes dynamic after the first
  # change: a handful of compiles (about 15 s each on the H200) for the 12 points
  stage bench_grid 180 "${BENCH[@]}" --sizes 1M,16M --ns 2,4,8 --dtypes fp32,bf16 --impls cuda,triton,eager,compiled \
    --out "$LOGS/bench_grid.json"
  stage optimizer 90 "$PY" benchmarks/bench_optimizer.py --device cuda --model gpt2 --n 4 --rounds 8 --warmup 2 \
    --loss-calls 20 --methods noon pama pama_accum_fwd linear --out "$LOGS/optimizer.json"
  # issue 15: bf16, B*T 16k, H 4096, V 128k; fused against unfused (and Liger for N = 1 if installed)
  stage fused_linear 120 "$PY" benchmarks/bench_fused_linear.py --device cuda --reps 3 --out "$LOGS/fused_linear.json"
else
  stage bench_goal 180 "$PY" benchmarks/bench_gpu_loss.py --dry-run --impls triton,eager --ns 4 --host-overhead \
    --out "$LOGS/bench_goal.json"
  stage kernel_profile 120 "$PY" benchmarks/gpu_kernel_profile.py --dry-run --ns 2 --out "$LOGS/kernel_profile.json"
  stage raise_paths_cpp 60 "$PY" benchmarks/gpu_sanitize_case.py --backend cpp --device cpu --raise-paths
  stage optimizer 120 "$PY" benchmarks/bench_optimizer.py --device cpu --model tiny --n 2 --rounds 1 --warmup 1 \
    --loss-calls 2 --methods noon pama --out "$LOGS/optimizer.json"
  stage fused_linear 120 "$PY" benchmarks/bench_fused_linear.py --device cpu --batch 2 --time 64 --hidden 32 \
    --vocab 1000 --reps 1 --out "$LOGS/fused_linear.json"
fi

# ------------------------------------------------------------------ report
"$PY" benchmarks/gpu_check_report.py --logs "$LOGS" --out "$RES/gpu_check.json" $([ "$DRY" = 1 ] && echo --dry-run)
rc=$?
{
  for f in "$LOGS"/*.log; do echo "===== $(basename "$f")"; cat "$f"; done
} >"$RES/gpu_check_log.txt"
echo "[gpu_check] wrote $RES/gpu_check.json and $RES/gpu_check_log.txt in $(( SECONDS - START ))s"
exit $rc
