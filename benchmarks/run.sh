#!/usr/bin/env bash
# Sets up a fresh machine and runs the benchmarks:
#   bash benchmarks/run.sh [extra arguments for the scripts, e.g. --quick]
# Same set-up as tests/run.sh (torch only if none is installed, upstream's
# package, a build of this checkout), then upstream vs ours on whatever device
# is found (float32, and on a GPU float16 too); tables are printed and JSON
# written under benchmarks/results/<device>/ (or --out DIR), then the verdict
# on the GPU targets (verdict.py). For a machine that is set up already (no
# network), run_device.sh runs the same set into one folder, with logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -q ninja pybind11 "backgroundmattingv2==1.0"
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton
"$PY" -m pip install -q --no-deps --no-build-isolation --force-reinstall -v . > build.log 2>&1 \
    || { tail -n 60 build.log; exit 1; }
# What was built (from outside the source tree, so the installed copy loads).
(cd / && "$PY" -c "import pymatting_ext, pprint; pprint.pprint(pymatting_ext.build_info())")

cd benchmarks
# float32 everywhere; on a GPU also float16 (the refiner at HD and 4K in both).
DTYPES=float32
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DTYPES="float32 float16"
fi
# shellcheck disable=SC2086  # DTYPES is a list: one process runs each dtype in turn
"$PY" bench_refiner.py --dtype $DTYPES "$@"
# shellcheck disable=SC2086
"$PY" bench_ops.py --dtype $DTYPES "$@"
# The GPU targets against the results (the folder of --out if given).
OUT_ARGS=()
prev=
for arg in "$@"; do
    [ "$prev" = --out ] && OUT_ARGS=("$arg")
    case $arg in --out=*) OUT_ARGS=("${arg#--out=}") ;; esac
    prev=$arg
done
"$PY" verdict.py "${OUT_ARGS[@]}"
