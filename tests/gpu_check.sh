#!/usr/bin/env bash
# The GPU check: everything a GPU must prove about this package, in one run
# on a bare GPU machine without network (torch, Triton, nvcc, pytest-xdist and
# compute-sanitizer installed there; upstream's wheel carried in .whl/, with
# Pillow's and tqdm's for the GPU test of convert_video, fetched beforehand by
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 -d .whl backgroundmattingv2==1.0 pillow tqdm
# ):
#
#   OUT=/some/folder bash tests/gpu_check.sh [PHASE ...]
#
# Phases, in order (default: all):
#   env       the machine: GPU, driver, versions
#   deps      upstream's package (and Pillow, tqdm) from the wheels in .whl/
#             (pip --no-index)
#   build     this checkout, for the GPU found only (its compute capability),
#             installed into a folder of its own (put first on PYTHONPATH)
#   tests     the GPU tests in parallel (pytest -n): test_gpu.py, test_cuda.py
#             and every CUDA case of the other files; compute-sanitizer
#             (sanitize_cases.py: memcheck on every op, racecheck, synccheck
#             and initcheck on the selects) runs beside them
#   bench     benchmarks/run_device.sh: refiner and ops, fp32 and fp16, eager
#             and CUDA graph, then the verdict on the targets
# Every phase runs even if an earlier one failed, under its own time limit,
# and prints its verdict and duration. Logs, JSON and the summary go to one
# work folder, packed into $OUT as gpu_check.tar.gz beside summary.txt and
# verdict.txt (few files: the device tool brings back at most eight).
# Without a GPU (a rehearsal) the build leaves CUDA out, the GPU tests skip,
# the sanitizer harness runs on the CPU kernels without a sanitizer, and the
# benchmarks run on the CPU (set BENCH_ARGS="--quick --settings HD" there).
# Time limits (seconds): LIMIT_BUILD (240), LIMIT_TESTS (240), LIMIT_SANITIZE
# (240, beside the tests), LIMIT_BENCH (190; REFINER_TIMEOUT 95,
# OPS_TIMEOUT 65 and, in what is left, MEMORY_TIMEOUT 45 inside it): at most about 11 minutes, about 7 expected on an
# H100, so that a second, shorter run (say `bash tests/gpu_check.sh build
# tests`) fits in the same quarter hour.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/site" "$WORK/pkg"
PY=${PYTHON:-python3}
PHASES=${*:-env deps build tests bench}
SUMMARY=$LOGS/summary.txt
# The build and upstream's wheel are found first, ahead of anything installed.
export PYTHONPATH=$WORK/pkg:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
START=$SECONDS

GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
NPROC=$(nproc 2>/dev/null || echo 2)
WORKERS=$(( NPROC / 2 > 8 ? 8 : (NPROC / 2 < 1 ? 1 : NPROC / 2) ))
echo "gpu_check: GPU=$GPU, $NPROC cores, phases: $PHASES, work folder $WORK" | tee "$SUMMARY"

# run_phase NAME LIMIT COMMAND...: the command's output to $LOGS/NAME.log, a
# verdict line to the summary, the log's tail to the console.
run_phase() {
    local name=$1 limit=$2 t0=$SECONDS rc verdict
    shift 2
    timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict="TIMEOUT (${limit} s)" ;;
        *) verdict="FAIL (exit $rc)" ;;
    esac
    printf '%-10s %-22s %5d s\n' "$name" "$verdict" $((SECONDS - t0)) >> "$SUMMARY"
    echo "--- $name: $verdict, $((SECONDS - t0)) s; log tail:"
    tail -n 12 "$LOGS/$name.log" | sed 's/^/    /'
}

phase_env() {
    nvidia-smi || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.0f} GiB")
EOF
    command -v nvcc && nvcc --version | tail -n 2
    sanitizer || true
}

sanitizer() {
    for s in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer; do
        if [ -n "$s" ] && [ -x "$s" ]; then echo "$s"; return 0; fi
    done
    echo "compute-sanitizer not found" >&2
    return 1
}

phase_deps() {
    if ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$ROOT"/.whl/*.whl || return 1
    fi
    "$PY" -c "import BackgroundMattingV2, torchvision; print('upstream:', BackgroundMattingV2.__file__)"
}

phase_build() {
    local cuda=0 arch=""
    if [ "$GPU" = 1 ]; then
        cuda=1
        arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    fi
    echo "building with PYMATTING_EXT_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC"
    PYMATTING_EXT_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC \
        "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir -v \
        --target "$WORK/pkg" "$ROOT" || return 1
    (cd / && "$PY" - "$cuda" <<'EOF'
import os, sys
import pymatting_ext
info = pymatting_ext.build_info()
print(info, "from", pymatting_ext.__file__)
assert info["loaded"], info["load_error"]
assert pymatting_ext.__file__.startswith(os.environ["WORK"]), "another pymatting_ext shadows the build"
if sys.argv[1] == "1":
    assert info["compiled"] == "cpu+cuda", "the CUDA kernels were not built"
EOF
    )
}

phase_tests() {
    cd "$ROOT/tests" || return 1
    local timeout_arg=()
    "$PY" -c "import pytest_timeout" 2> /dev/null && timeout_arg=(--timeout 150)
    # The GPU cases: everything in test_gpu.py and test_cuda.py, and every
    # case of the other files whose name says cuda (their device parameter).
    # -v: a line per finished test, so that a run stopped at its time limit
    # still says what passed and failed.
    "$PY" -m pytest -v -p no:cacheprovider -n "$WORKERS" "${timeout_arg[@]}" -rfE \
        --junitxml="$LOGS/junit.xml" -k "cuda or test_gpu" .
}

phase_sanitize() {
    cd "$ROOT/tests" || return 1
    if [ "$GPU" != 1 ]; then
        echo "no GPU: the harness alone, on the CPU kernels"
        "$PY" sanitize_cases.py ops cpu && "$PY" sanitize_cases.py select cpu
        return
    fi
    local s
    s=$(sanitizer) || return 1
    local common=(--error-exitcode 1 --print-limit 20)
    # NB: without the caching allocator every tensor is its own allocation,
    # so memcheck and initcheck see accesses past a tensor's end.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$s" --tool memcheck "${common[@]}" "$PY" sanitize_cases.py ops \
        > "$LOGS/memcheck_ops.log" 2>&1 &
    local m1=$!
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$s" --tool memcheck "${common[@]}" "$PY" sanitize_cases.py select \
        > "$LOGS/memcheck_select.log" 2>&1 &
    local m2=$!
    "$s" --tool racecheck "${common[@]}" "$PY" sanitize_cases.py select > "$LOGS/racecheck_select.log" 2>&1 &
    local r=$!
    "$s" --tool synccheck "${common[@]}" "$PY" sanitize_cases.py select > "$LOGS/synccheck_select.log" 2>&1 &
    local y=$!
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$s" --tool initcheck "${common[@]}" "$PY" sanitize_cases.py select \
        > "$LOGS/initcheck_select.log" 2>&1 &
    local i=$!
    local failed=0 pid name
    for pair in "$m1:memcheck_ops" "$m2:memcheck_select" "$r:racecheck_select" "$y:synccheck_select" \
                "$i:initcheck_select"; do
        pid=${pair%%:*}
        name=${pair#*:}
        if wait "$pid"; then echo "$name: clean"; else echo "$name: FAILED"; failed=1; fi
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|wrong results" "$LOGS/$name.log" | sed "s/^/  $name: /"
    done
    return $failed
}

phase_bench() {
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    bash "$ROOT/benchmarks/run_device.sh" "$WORK/bench" ${BENCH_ARGS:-}
}

export -f phase_env phase_deps phase_build phase_tests phase_sanitize phase_bench sanitizer
export ROOT WORK LOGS PY GPU NPROC WORKERS

for phase in $PHASES; do
    case $phase in
        env) run_phase env 60 bash -c phase_env ;;
        deps) run_phase deps 120 bash -c phase_deps ;;
        build) run_phase build "${LIMIT_BUILD:-240}" bash -c phase_build ;;
        tests)
            # The sanitizers beside the tests: neither is timed.
            run_phase sanitize "${LIMIT_SANITIZE:-240}" bash -c phase_sanitize &
            san=$!
            run_phase tests "${LIMIT_TESTS:-240}" bash -c phase_tests
            wait "$san"
            ;;
        sanitize) run_phase sanitize "${LIMIT_SANITIZE:-240}" bash -c phase_sanitize ;;
        bench) REFINER_TIMEOUT=${REFINER_TIMEOUT:-95} OPS_TIMEOUT=${OPS_TIMEOUT:-65} MEMORY_TIMEOUT=${MEMORY_TIMEOUT:-45} \
                   run_phase bench "${LIMIT_BENCH:-190}" bash -c phase_bench ;;
        *) echo "unknown phase $phase" | tee -a "$SUMMARY" ;;
    esac
done

printf '%-10s %-22s %5d s\n' "all" "" $((SECONDS - START)) >> "$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
[ -f "$WORK/bench/verdict.txt" ] && cp "$WORK/bench/verdict.txt" "$OUT/verdict.txt"
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" logs $( [ -d "$WORK/bench" ] && echo bench )
echo
echo "=== failures (tests) ==="
grep -E "^(FAILED|ERROR) " "$LOGS/tests.log" 2> /dev/null | head -n 40
grep -cE "(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)( |$)" "$LOGS/tests.log" 2> /dev/null | sed 's/^/test results logged: /'
echo "=== verdict ==="
[ -f "$OUT/verdict.txt" ] && grep -vE "NOT MEASURED|^$" "$OUT/verdict.txt" | tail -n 40
echo "=== summary ==="
cat "$OUT/summary.txt"
