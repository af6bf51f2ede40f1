#!/usr/bin/env bash
# The one command of a GPU session: environment -> build -> GPU tests -> benchmark -> files under $OUT.
#
# Device command (the `run` tool, from the repository root, one line):
#
#     bash benchmarks/gpu_run.sh
#
# Made for the GPU image (python 3.12, torch cu130, triton, nvcc, ninja, no package registry) and a
# window of a few minutes: every step runs under its own `timeout`, and the steps together stay
# under GPU_RUN_TOTAL_S (default 520 s, below the 600 s one command may run).  Needs neither dev.sh
# nor the network.  The benchmark runs in priority order (ResNet-34 b1 and b256 fp16, then ResNet-56
# b256 fp16, then the rest) and stops starting measurements when the time left runs out; every
# result is written as soon as it exists, so a cut-short run still leaves its files.
#
# Files under $OUT (default ./gpu_run_out): gpu_run.log (everything), env.txt, build.log, tests.log,
# bench.log, tables.log, bench_gpu.json + bench_gpu.md (the reports of the priority cases, per-layer
# table included), rest/ (the reports of the other cases), layers.md (the per-layer table alone),
# kernel_notes.md (registers/shared memory/instructions per kernel, AOT for sm_90).
#
# Environment: GPU_RUN_DRY=1 prints the plan and runs nothing; GPU_RUN_TOTAL_S sets the whole
# budget; MANIDP_TRITON_AUTOTUNE=1 autotunes the Triton kernels (default 0: one fixed config per
# mode, tile rows and dtype, which keeps the compile count bounded: docs/DESIGN.md 7.4).
set -u
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_run_out}"
TOTAL_S="${GPU_RUN_TOTAL_S:-520}"
DRY="${GPU_RUN_DRY:-0}"
PY="${PYTHON:-python3}"
export MANIDP_TRITON_AUTOTUNE="${MANIDP_TRITON_AUTOTUNE:-0}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
START=$(date +%s)

# Per-step limits (seconds); the benchmark gets what is left of TOTAL_S minus the closing steps.
ENV_S=30
BUILD_S=200
JIT_S=150
TESTS_S=120
LAYERS_S=15
KERNELS_S=75
CLOSE_S=$(( LAYERS_S + KERNELS_S ))
BENCH_CASES_FIRST="r34-b1,r34-b256,r56-b256"
BENCH_CASES_REST="r34-b64,r56-b1,r18-b1"

mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
: > "$LOG"

say() { echo "[gpu_run $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }

RESERVE=$CLOSE_S  # seconds kept for the closing steps (0 while they run)

# step NAME LIMIT_S LOGFILE CMD...: CMD under `timeout LIMIT_S` (cut to the time left but RESERVE),
# output to LOGFILE and the log.  A step with under 5 s left is skipped (rc 124).
step() {
    local name="$1" limit="$2" file="$3"
    shift 3
    local cmd="$*"
    cmd="${cmd//$'\n'/ }"
    if [ "$DRY" = "1" ]; then
        echo "step $name (timeout ${limit}s, log $(basename "$file")): ${cmd:0:240}"
        return 0
    fi
    local avail=$(( $(left) - RESERVE ))
    [ "$limit" -gt "$avail" ] && limit=$avail
    if [ "$limit" -lt 5 ]; then
        say "step $name skipped: no time left"
        return 124
    fi
    say "step $name (limit ${limit}s): ${cmd:0:240}"
    timeout --kill-after=10 "$limit" "$@" > >(tee -a "$file" >> "$LOG") 2>&1
    local rc=$?
    say "step $name rc=$rc"
    return $rc
}

# 1. Environment.
env_report() {
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    nvcc --version || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || true
    which ninja compute-sanitizer || true
    nproc; free -g || true
}
step env "$ENV_S" "$OUT/env.txt" bash -c "$(declare -f env_report); PY=$PY; env_report"

# 2. Build the extension (C++ and CUDA into manidp._C).  Where pip fails quickly (not a timeout),
#    setup.py builds in place without pip; where manidp._C then lacks the CUDA kernels, a JIT build
#    of csrc/cuda adds them (the triton backend needs neither).
step build "$BUILD_S" "$OUT/build.log" "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e .
rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ]; then
    step build-inplace "$BUILD_S" "$OUT/build.log" "$PY" setup.py build_ext --inplace
    # Without the editable install, manidp.kernels (kernels/, setup.py's package_dir) needs a link.
    [ "$DRY" = "1" ] || [ -e manidp/kernels ] || ln -s ../kernels manidp/kernels
fi
if [ "$DRY" = "1" ] || ! "$PY" -c "from manidp.deploy.cuda_backend import cuda_ops_available as a; assert a()" \
        >> "$LOG" 2>&1; then
    step jit-build "$JIT_S" "$OUT/build.log" "$PY" -c \
        "from manidp.deploy.cuda_backend import build_cuda_ops; build_cuda_ops(verbose=True); print('JIT build ok')"
    export MANIDP_CUDA_JIT=1
fi

# 3. GPU tests, the sanitizer excluded (it is opt-in: MANIDP_SANITIZER=1).
step tests "$TESTS_S" "$OUT/tests.log" "$PY" -m pytest -q -rfE -p no:cacheprovider -m gpu --maxfail=5 \
    tests/test_gpu.py -k "not sanitizer and not memcheck"

# 4. Benchmark in priority order, within what is left.
bench() {  # bench OUT_DIR CASES DTYPES EXTRA...: bench_gpu.py with --max-minutes from the time left
    local dir="$1" cases="$2" dtypes="$3"
    shift 3
    local budget=$(( $(left) - RESERVE ))
    if [ "$DRY" != "1" ] && [ "$budget" -lt 30 ]; then
        say "no time left for $cases $dtypes"
        return 0
    fi
    # bench_gpu.py stops starting measurements at --max-minutes; the timeout ends a measurement that overruns.
    local minutes
    minutes=$(awk -v b="$budget" 'BEGIN { printf "%.2f", (b - 20) / 60 }')
    step "bench $cases $dtypes" "$budget" "$OUT/bench.log" "$PY" benchmarks/bench_gpu.py --out "$dir" \
        --cases "$cases" --dtypes "$dtypes" --max-minutes "$minutes" "$@"
}
bench "$OUT" "$BENCH_CASES_FIRST" fp16 --no-compile --layers
bench "$OUT/rest" "$BENCH_CASES_REST" fp16,bf16 --no-compile --no-correctness

# 5. The per-layer table and the kernel table.
RESERVE=0
step layers "$LAYERS_S" "$OUT/tables.log" "$PY" benchmarks/gpu_kernel_table.py --layers "$OUT/bench_gpu.json" \
    --write "$OUT/layers.md"
step kernels "$KERNELS_S" "$OUT/tables.log" "$PY" benchmarks/gpu_kernel_table.py --write "$OUT/kernel_notes.md"
[ "$DRY" = "1" ] || say "done; files: $(ls "$OUT" | tr '\n' ' ')"
exit 0
