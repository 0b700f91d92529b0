#!/usr/bin/env bash
# The GPU check: everything a GPU must prove about this package, split into
# commands that each fit one call of the GPU machine (600 s at most; each
# command here has a deadline of 540 s in all):
#
#   OUT=$OUT bash tests/gpu_check.sh part1    # env deps build fused warmup tests
#   OUT=$OUT bash tests/gpu_check.sh part2    # deps build sanitize ddp bench
#   OUT=$OUT bash tests/gpu_check.sh part3    # deps build tiling extra (optional)
#   OUT=$OUT bash tests/gpu_check.sh PHASE ...   # any phases, in the order given
#
# The commands share a fixed work folder (build/gpu_check, git-ignored, so it
# stays on a warm machine between calls): the second command's build phase
# reuses the first one's extension through setup.py's hash (about 20 s), and
# Triton's compiled kernels through a cache folder inside it.
#
# What must be carried to the GPU machine beforehand: only upstream's package,
# the one thing its image lacks (it has torch, torchvision, Triton, nvcc,
# pytest, pytest-xdist, pytest-timeout, Pillow, tqdm, numpy, onnxruntime and
# compute-sanitizer). Fetch its wheel here once (pure Python):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl backgroundmattingv2==1.0
# and name `.whl` in the call's carry. Without it the deps phase fails
# loudly, and so does every test phase (no module silently skipped).
#
# Phases (limit in seconds, the most a phase may take; LIMIT_<PHASE>
# overrides one):
#   env      20   the machine: GPU, driver, versions
#   deps     25   upstream's package from .whl/ (pip --no-index), checked
#   build   180   this checkout for the GPU found (its compute capability
#                 only), into the work folder; reused when the sources match
#   fused   120   tests/refiner/test_fused.py in one process, first: the fused
#                 kernel's cases (bf16, duplicate cells, odd sizes, ...)
#   warmup   45   the other Triton kernels compiled in one process, for
#                 fp32, fp16 and bf16, before xdist starts
#   tests   150   the GPU tests in parallel (pytest -n): every CUDA case
#                 (the tests of the CUDA kernels, the classes
#                 TestCUDAKernels, and every case whose name says cuda),
#                 without the heavy ones (marker gpu_extra)
#   sanitize 80   compute-sanitizer (sanitize_cases.py: memcheck on every op,
#                 racecheck, synccheck and initcheck on the selects), after
#                 the tests, the sanitizers side by side
#   ddp      90   tests/models/test_ddp.py's NCCL case: SyncBatchNorm, DDP, GradScaler and
#                 autocast, one training step against upstream's (its CPU cases
#                 run in CI)
#   bench   160   benchmarks/run_device.sh (refiner, ops, peak memory), then
#                 the verdict on the targets
#   tiling   90   benchmarks/bench_fused_tiling.py: the fused kernel's
#                 BLOCK_P x num_warps timed, fp32 and fp16, kernel size 3
#   extra   240   the heavy GPU cases (marker gpu_extra): the Inductor
#                 fullgraph compiles, the 4K batch-4 comparisons
# part1 adds up to 540 s, part2 to 535 s, part3 to 535 s. Besides, no phase
# may run past the command's deadline (GPU_CHECK_DEADLINE, 540 s after the
# start): a phase gets what is left, one with nothing left is skipped.
#
# What comes back, in $OUT, rewritten after every phase and every 20 s while
# one runs (so that a command killed at any moment still brings back what it
# finished): summary.txt (each phase's verdict, duration and test counts, and
# the phase running now), tails.txt (the end of each phase's log),
# gpu_check.tar.gz (every log, the JUnit files, the benchmark JSON) and
# verdict.txt (the benchmarks' verdict). Four files: the device tool brings
# back at most eight.
#
# Without a GPU (a rehearsal, with the same limits and deadline) the build
# leaves CUDA out, the GPU tests skip, the sanitizer harness runs on the CPU
# kernels without a sanitizer, the fused cases run through Triton's
# interpreter, and the benchmarks run on the CPU (BENCH_ARGS="--quick
# --settings HD" there).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEADLINE=${GPU_CHECK_DEADLINE:-540}
# Named parts: the documented sequence of commands.
declare -A PARTS=(
    [part1]="env deps build fused warmup tests"
    [part2]="deps build sanitize ddp bench"
    [part3]="deps build tiling extra"
)
declare -A LIMITS=(
    [env]=20 [deps]=25 [build]=180 [fused]=120 [warmup]=45 [tests]=150
    [sanitize]=80 [ddp]=90 [bench]=160 [tiling]=90 [extra]=240
)
# --plan: each part's phases and limits, and their sum against the deadline.
if [ "${1:-}" = --plan ]; then
    for part in part1 part2 part3; do
        total=0 line=""
        for phase in ${PARTS[$part]}; do
            line+=" $phase ${LIMITS[$phase]}"
            total=$((total + LIMITS[$phase]))
        done
        echo "$part:$line = $total s (deadline $DEADLINE s)"
    done
    exit 0
fi
OUT=${OUT:-$ROOT/build/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$ROOT/build/gpu_check}
LOGS=$WORK/logs
mkdir -p "$LOGS" "$WORK/site" "$WORK/pkg" "$WORK/bench"
WORK=$(cd "$WORK" && pwd)
PY=${PYTHON:-python3}
START=$SECONDS

PHASES=()
for arg in ${*:-part1}; do
    if [ -n "${PARTS[$arg]:-}" ]; then
        # shellcheck disable=SC2206  # a part is a list of phase names
        PHASES+=(${PARTS[$arg]})
    else
        PHASES+=("$arg")
    fi
done

# The build and upstream's wheel are found first, ahead of anything installed;
# Triton's compiled kernels are kept in the work folder for the next command.
export PYTHONPATH=$WORK/pkg:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$WORK/triton_cache

GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
NPROC=$(nproc 2>/dev/null || echo 2)
WORKERS=$(( NPROC / 2 > 8 ? 8 : (NPROC / 2 < 1 ? 1 : NPROC / 2) ))
# The summary keeps every command's lines; RAN, this command's phases (for
# tails.txt: a file, so that the background copy sees them too).
SUMMARY=$LOGS/summary.txt
STATUS=$LOGS/status.txt
RAN=$LOGS/ran.txt
: > "$RAN"
printf '\n# %s: gpu_check %s (GPU=%s, %s cores, deadline %s s)\n' "$(date -u +%FT%TZ)" \
    "${PHASES[*]}" "$GPU" "$NPROC" "$DEADLINE" >> "$SUMMARY"
: > "$STATUS"

# put SRC NAME: SRC into $OUT/NAME by a rename, so that a command killed while
# copying leaves the previous version, not half a file. The copy is staged on
# $OUT's file system but outside $OUT where the work folder shares it (a kill
# between the copy and the rename then leaves nothing in $OUT either), in $OUT
# otherwise; its name carries the process, as two publishers may run at once.
if [ "$(stat -c %d "$WORK")" = "$(stat -c %d "$OUT")" ]; then
    STAGE=$WORK/stage
else
    STAGE=$OUT
fi
mkdir -p "$STAGE"
rm -f "$OUT"/.*.part
put() {
    local part=$STAGE/.$2.$BASHPID.part
    cp "$1" "$part" 2> /dev/null && mv -f "$part" "$OUT/$2"
}

# publish: the summary, the logs' tails, the logs and the verdict into $OUT
# (temporary files named by the process, as the background copy may run at
# the same moment as the main one).
publish() {
    local name tmp=$WORK/out.$BASHPID
    mkdir -p "$tmp"
    cat "$SUMMARY" "$STATUS" > "$tmp/summary.txt" 2> /dev/null
    put "$tmp/summary.txt" summary.txt
    while read -r name; do
        echo "=== $name ==="
        tail -n 40 "$LOGS/$name.log" 2> /dev/null
    done < "$RAN" > "$tmp/tails.txt"
    put "$tmp/tails.txt" tails.txt
    # NB: tar exits 1 when a log grows while it reads it; the archive is whole.
    tar -czf "$tmp/logs.tar.gz" -C "$WORK" logs bench 2> /dev/null
    [ $? -le 1 ] && put "$tmp/logs.tar.gz" gpu_check.tar.gz
    [ -f "$WORK/bench/verdict.txt" ] && put "$WORK/bench/verdict.txt" verdict.txt
    rm -rf "$tmp"
    return 0
}

# A background copy every 20 s, so that a command cut off in the middle of a
# phase still brings back that phase's log up to then.
( while sleep 20; do publish; done ) &
TICKER=$!
trap 'kill "$TICKER" 2> /dev/null' EXIT

# test_counts JUNIT: "N passed, N failed, N errors, N skipped" from a JUnit file.
test_counts() {
    [ -f "$1" ] || return 0
    "$PY" - "$1" <<'EOF' 2> /dev/null
import sys
import xml.etree.ElementTree as ET
n = dict(tests=0, failures=0, errors=0, skipped=0)
for suite in ET.parse(sys.argv[1]).getroot().iter("testsuite"):
    for key in n:
        n[key] += int(suite.get(key, 0))
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
EOF
}

# run_phase NAME COMMAND...: the command's output to $LOGS/NAME.log under
# the phase's limit (cut to what is left before the deadline), a verdict line
# to the summary, the log's tail to the console, everything to $OUT.
run_phase() {
    local name=$1 limit=${LIMITS[$1]:-60} t0=$SECONDS rc verdict left counts
    shift
    limit=$(eval echo "\${LIMIT_${name^^}:-$limit}")
    left=$(( DEADLINE - (SECONDS - START) - 10 ))
    echo "$name" >> "$RAN"
    if [ "$left" -lt 5 ]; then
        printf '%-9s %-30s %5d s  (no time left before the %s s deadline)\n' "$name" "SKIPPED" 0 "$DEADLINE" \
            >> "$SUMMARY"
        echo "skipped: no time left before the deadline" > "$LOGS/$name.log"
        publish
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    rm -f "$LOGS/$name.xml"
    printf '%-9s %-30s since %d s (limit %d s)\n' "$name" "RUNNING" $((SECONDS - START)) "$limit" > "$STATUS"
    publish
    timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict="TIMEOUT (${limit} s)" ;;
        *) verdict="FAIL (exit $rc)" ;;
    esac
    counts=$(test_counts "$LOGS/$name.xml")
    printf '%-9s %-30s %5d s%s\n' "$name" "$verdict" $((SECONDS - t0)) "${counts:+  ($counts)}" >> "$SUMMARY"
    : > "$STATUS"
    publish
    echo "--- $name: $verdict, $((SECONDS - t0)) s${counts:+, $counts}; log tail:"
    tail -n 12 "$LOGS/$name.log" | sed 's/^/    /'
}

phase_env() {
    nvidia-smi || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "torchvision", "xdist", "pytest_timeout", "onnxruntime"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "(no version)"))
    except ImportError:
        print(name + ": not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", f"{p.total_memory / 2**30:.0f} GiB")
EOF
    command -v nvcc && nvcc --version | tail -n 2
    sanitizer || true
    df -h "$WORK" | tail -n 1
}

sanitizer() {
    for s in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
             /usr/local/cuda/bin/compute-sanitizer; do
        if [ -n "$s" ] && [ -x "$s" ]; then echo "$s"; return 0; fi
    done
    echo "compute-sanitizer not found" >&2
    return 1
}

# Every phase that tests the package tests the work folder's build, and fails
# without it (not some other pymatting_ext found on the path).
require_build() {
    (cd / && "$PY" -c "import os, pymatting_ext as p; assert p.__file__.startswith(os.environ['WORK'] + '/pkg/')" \
        2> /dev/null) && return 0
    echo "ERROR: no build of this checkout in $WORK/pkg: run the build phase first."
    return 1
}

# Every phase that compares with upstream fails, rather than skips, without it.
require_upstream() {
    "$PY" -c "import BackgroundMattingV2" 2> /dev/null && return 0
    echo "ERROR: upstream's package (backgroundmattingv2==1.0) cannot be imported: its tests would all skip." \
         "Carry its wheel in .whl/ (see the header of tests/gpu_check.sh) and run the deps phase."
    return 1
}

phase_deps() {
    if ls "$ROOT"/.whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$ROOT"/.whl/*.whl || return 1
    else
        echo "no wheels in $ROOT/.whl"
    fi
    require_upstream || return 1
    "$PY" -c "import BackgroundMattingV2, torchvision, pytest; print('upstream:', BackgroundMattingV2.__file__)"
}

phase_build() {
    local settings=(PYMATTING_EXT_CUDA=0)
    if [ "$GPU" = 1 ]; then
        settings=(PYMATTING_EXT_CUDA=1
                  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")")
    fi
    echo "building with ${settings[*]} MAX_JOBS=$NPROC"
    # NB: into a new folder, then swapped in: the build in $WORK/pkg stays on
    # PYTHONPATH meanwhile, which is what setup.py reuses when its hash matches.
    rm -rf "$WORK/pkg.new"
    env "${settings[@]}" MAX_JOBS="$NPROC" "$PY" -m pip install --no-index --no-deps --no-build-isolation \
        --no-cache-dir -v --target "$WORK/pkg.new" "$ROOT" > "$LOGS/build_pip.log" 2>&1 \
        || { tail -n 40 "$LOGS/build_pip.log"; return 1; }
    grep -m1 -o 'pymatting_ext extension: .*' "$LOGS/build_pip.log"
    rm -rf "$WORK/pkg" && mv "$WORK/pkg.new" "$WORK/pkg" || return 1
    (cd / && "$PY" - "$GPU" <<'EOF'
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

# pytest_phase NAME ARGS...: pytest in tests/, a line per finished test (so
# that a phase cut off still says what passed and failed), skip reasons at
# the end, JUnit to $LOGS/NAME.xml.
pytest_phase() {
    local name=$1 timeout_arg=()
    shift
    cd "$ROOT/tests" || return 1
    require_build && require_upstream || return 1
    "$PY" -c "import pytest_timeout" 2> /dev/null && timeout_arg=(--timeout 120)
    "$PY" -m pytest -v -p no:cacheprovider "${timeout_arg[@]}" -rfEs --junitxml="$LOGS/$name.xml" "$@"
}

# xdist: the arguments that spread tests over $WORKERS processes (none where
# pytest-xdist is missing, as on a CPU rehearsal).
xdist() {
    if "$PY" -c "import xdist" 2> /dev/null; then echo "-n $WORKERS"; else echo "(pytest-xdist missing: one process)" >&2; fi
}

phase_fused() {
    pytest_phase fused refiner/test_fused.py
}

phase_warmup() {
    # NB: from /, so that the build in the work folder is imported, not the
    # checkout's pymatting_ext folder.
    cd / || return 1
    require_build || return 1
    [ "$GPU" = 1 ] || export TRITON_INTERPRET=1
    "$PY" - <<'EOF'
import time
import torch
import pymatting_ext
if torch.cuda.is_available():
    device, dtypes, kw = "cuda", (torch.float32, torch.float16, torch.bfloat16), {}
else:  # the interpreter compiles nothing: one small pass, to rehearse the call
    device, dtypes, kw = "cpu", (torch.float32,), dict(modes=("sampling",), epilogue=False)
for dtype in dtypes:
    t0 = time.perf_counter()
    counts = pymatting_ext.warmup(device, dtype, **kw)
    print(f"{dtype}: {time.perf_counter() - t0:.1f} s, compiled variants {counts or '(interpreter: none)'}")
EOF
}

phase_tests() {
    # The GPU cases: every case whose name says cuda (its (device, backend)
    # parameter, its class TestCUDAKernels, or its own name); not the fused
    # file (run first, alone), the DDP file (its own phase), the host harness
    # and this script's own test (CPU only) or the heavy cases (part3).
    pytest_phase tests $(xdist) -k "cuda" -m "not gpu_extra and not cuda_host" \
        --ignore=refiner/test_fused.py --ignore=models/test_ddp.py --ignore=build_checks/test_gpu_check.py .
}

phase_sanitize() {
    cd "$ROOT/tests" || return 1
    require_build || return 1
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

phase_ddp() {
    pytest_phase ddp models/test_ddp.py -k nccl
}

phase_bench() {
    # The scripts' own limits, inside the phase's: each one that hangs leaves
    # the others their time.
    require_build || return 1
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    REFINER_TIMEOUT=${REFINER_TIMEOUT:-65} OPS_TIMEOUT=${OPS_TIMEOUT:-40} TILING_TIMEOUT=0 \
        MEMORY_TIMEOUT=${MEMORY_TIMEOUT:-20} bash "$ROOT/benchmarks/run_device.sh" "$WORK/bench" ${BENCH_ARGS:-}
}

phase_tiling() {
    require_build || return 1
    cd "$ROOT/benchmarks" || return 1
    # It stops by itself 10 s before the phase's limit (each tiling's first
    # call compiles it); what it finished is in fused_tiling_<dtype>.json.
    local args=(--dtype float32 float16)
    [ "$GPU" = 1 ] || args=(--dtype float32 --quick)  # a rehearsal: the interpreter's smoke pass
    "$PY" bench_fused_tiling.py "${args[@]}" --kernel-size 3 --time-limit 80 --out "$WORK/bench"
}

phase_extra() {
    pytest_phase extra $(xdist) -m gpu_extra .
}

export -f phase_env phase_deps phase_build phase_fused phase_warmup phase_tests phase_sanitize phase_ddp \
    phase_bench phase_tiling phase_extra sanitizer require_build require_upstream pytest_phase xdist
export ROOT WORK LOGS PY GPU NPROC WORKERS

echo "gpu_check: GPU=$GPU, $NPROC cores, phases: ${PHASES[*]}, work folder $WORK, deadline $DEADLINE s"
for phase in "${PHASES[@]}"; do
    if [ -z "${LIMITS[$phase]:-}" ]; then
        echo "unknown phase $phase" | tee -a "$SUMMARY"
        continue
    fi
    run_phase "$phase" bash -c "phase_$phase"
done

printf '%-9s %-30s %5d s\n' "all" "" $((SECONDS - START)) >> "$SUMMARY"
publish
echo
echo "=== failures ==="
while read -r phase; do
    grep -E "^(FAILED|ERROR) " "$LOGS/$phase.log" 2> /dev/null | head -n 20 | sed "s/^/$phase: /"
done < "$RAN"
echo "=== verdict ==="
[ -f "$OUT/verdict.txt" ] && grep -vE "NOT MEASURED|^$" "$OUT/verdict.txt" | tail -n 30
echo "=== summary ==="
cat "$OUT/summary.txt"
