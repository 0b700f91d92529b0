#!/usr/bin/env bash
# The benchmark set on a machine that is set up already (no installs, no
# network; `import pymatting_ext` and `import BackgroundMattingV2` work):
#   bash benchmarks/run_device.sh OUT_DIR [extra arguments for both scripts]
# On a GPU: bench_refiner.py (both error maps, eager and CUDA graph) and
# bench_ops.py, each in float32 and float16 in one process, then verdict.py;
# on a CPU the same in float32 (random err only). Every log, JSON and text
# goes into OUT_DIR: refiner_<dtype>.{json,txt}, ops_<dtype>.{json,txt},
# verdict.{json,txt}, bench_*.log, build_info.txt, nvidia-smi.txt, times.log;
# on a GPU also fused_tiling_<dtype>.{json,txt} (bench_fused_tiling.py, after
# the verdict, within TILING_TIMEOUT s).
# On a GPU, last, bench_memory.py (peak memory, ours beside upstream) in the
# time left. Each script runs under a timeout (REFINER_TIMEOUT, OPS_TIMEOUT,
# TILING_TIMEOUT, MEMORY_TIMEOUT seconds), so one that hangs leaves the others their time; a
# script writes each dtype's files as soon as that dtype is done. Rehearse on a CPU with
#   bash benchmarks/run_device.sh /tmp/rehearsal --quick --settings HD
set -uo pipefail
OUT=${1:?usage: bash benchmarks/run_device.sh OUT_DIR [extra arguments for both scripts]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
REFINER_TIMEOUT=${REFINER_TIMEOUT:-110}
OPS_TIMEOUT=${OPS_TIMEOUT:-80}
MEMORY_TIMEOUT=${MEMORY_TIMEOUT:-70}
TILING_TIMEOUT=${TILING_TIMEOUT:-90}
start=$SECONDS

"$PY" -c "import pymatting_ext, pprint; pprint.pprint(pymatting_ext.build_info())" > "$OUT/build_info.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || rm -f "$OUT/nvidia-smi.txt"
DTYPES=float32
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DTYPES="float32 float16"
fi

step() {  # step NAME TIMEOUT COMMAND...: runs it, logs it, records its time and exit status
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name: exit $rc$([ "$rc" = 124 ] && echo " (timed out after $limit s)"), $((SECONDS - t0)) s" \
        | tee -a "$OUT/times.log"
}

# shellcheck disable=SC2086  # DTYPES is a list
step bench_refiner "$REFINER_TIMEOUT" "$PY" bench_refiner.py --dtype $DTYPES --out "$OUT" "$@"
# shellcheck disable=SC2086
step bench_ops "$OPS_TIMEOUT" "$PY" bench_ops.py --dtype $DTYPES --out "$OUT" "$@"
step verdict 60 "$PY" verdict.py "$OUT"
# On a GPU: the fused kernel's tiling, BLOCK_P x num_warps at kernel_size 3
# (fused_tiling_<dtype>.json, written after every tiling). It stops by
# itself 10 s before TILING_TIMEOUT (shared by the dtypes; each tiling's
# first call compiles it, a few seconds, so 60 s or more time most of the
# nine tilings of both dtypes); the timeout is a backstop.
# TILING_TIMEOUT=0 leaves it out (tests/gpu_check.sh runs it as a phase of
# its own).
if [ "$DTYPES" != float32 ] && [ "$TILING_TIMEOUT" -gt 0 ]; then
    # shellcheck disable=SC2086
    step bench_fused_tiling "$TILING_TIMEOUT" "$PY" bench_fused_tiling.py --dtype $DTYPES --kernel-size 3 \
        --time-limit $((TILING_TIMEOUT > 20 ? TILING_TIMEOUT - 10 : TILING_TIMEOUT / 2)) --out "$OUT" "$@"
fi
# Last, in the time left: peak memory on a GPU (4K first: the bounded-memory
# case of thresholding 0.0; a fresh process per case; rows logged as they
# finish, so a run stopped at its limit still tells those).
if [ "$DTYPES" != float32 ]; then
    step bench_memory "$MEMORY_TIMEOUT" "$PY" bench_memory.py --settings 4K HD --timeout 30 --out "$OUT"
fi
echo "all: $((SECONDS - start)) s" | tee -a "$OUT/times.log"
