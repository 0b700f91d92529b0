#!/usr/bin/env bash
# Runs the CUDA kernels' op tests (the classes TestCUDAKernels in tests/ops)
# under compute-sanitizer's memcheck (GPU machines only; the package must be
# installed, e.g. by tests/run.sh):
#   bash tests/sanitize.sh [extra pytest arguments]
# Out-of-bounds or misaligned accesses, and CUDA API errors, fail the run.
# CUDA-graph tests are left out (memcheck does not support graph capture
# everywhere) and so is the device-assertion test (it aborts its child
# process on purpose).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
SANITIZER=${COMPUTE_SANITIZER:-compute-sanitizer}
if ! command -v "$SANITIZER" >/dev/null; then
    for d in "${CUDA_HOME:-}" /usr/local/cuda; do
        if [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then SANITIZER="$d/bin/compute-sanitizer"; break; fi
    done
fi
exec "$SANITIZER" --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" -m pytest -q -p no:cacheprovider ops -k "TestCUDAKernels and not graph and not assert" "$@"
