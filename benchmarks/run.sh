#!/usr/bin/env bash
# Sets up a fresh machine, runs the demo, then the benchmarks:
#   bash benchmarks/run.sh [--demo] [extra arguments for the benchmark scripts, e.g. --quick]
# Same set-up as tests/run.sh (tests/install.sh: torch only if none is
# installed, upstream's package, the command line's dependencies, and this
# checkout's pymatting_ext, its extension compiled only when the installed
# build does not match the checkout). Then:
#  1. the demo, `pymatting-ext demo`: a synthetic clip written, decoded,
#     matted and encoded (with the progress bar), then the speed table of
#     the whole model at its size; outputs in build/demo/. --demo stops here.
#  2. the whole model, upstream beside our backends (`pymatting-ext speed`,
#     resnet50 at HD and at 4K with upstream's 4K settings): a table, and
#     model_<dtype>.{json,txt,png} beside the other results;
#  3. the refiner and op benchmarks (float32, and on a GPU float16 too):
#     tables printed and JSON written under benchmarks/results/<device>/ (or
#     --out DIR), then the verdict on the GPU targets (verdict.py).
# For a machine that is set up already (no network), run_device.sh runs the
# benchmark set into one folder, with logs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEMO_ONLY=0
if [ "${1:-}" = "--demo" ]; then
    DEMO_ONLY=1
    shift
fi

bash tests/install.sh

# From build/, not the checkout's root: there `python -m pymatting_ext` would
# import the source folder (no compiled extension) instead of the installed
# package.
mkdir -p build
(cd build && "$PY" -m pymatting_ext demo --output-dir demo)
[ "$DEMO_ONLY" = 1 ] && exit 0

cd benchmarks
# float32 everywhere; on a GPU also float16 (the refiner at HD and 4K in both).
DTYPES=float32
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    DTYPES="float32 float16"
fi
# The folder of --out if given, else results/<device>/.
OUT_ARGS=()
prev=
for arg in "$@"; do
    [ "$prev" = --out ] && OUT_ARGS=("$arg")
    case $arg in --out=*) OUT_ARGS=("${arg#--out=}") ;; esac
    prev=$arg
done
RESULTS=${OUT_ARGS[0]:-$("$PY" -c "import torch, common
device = 'cuda' if torch.cuda.is_available() else 'cpu'
print(common.results_folder({'device': device, 'device_name': common.device_name(device)}))")}
mkdir -p "$RESULTS"
for dtype in $DTYPES; do
    precision=$([ "$dtype" = float16 ] && echo fp16 || echo fp32)
    # The table is printed and kept as model_<dtype>.txt.
    "$PY" -m pymatting_ext speed --backbone resnet50 --precision "$precision" \
        --resolution 1920 1080 0.25 80000 --resolution 3840 2160 0.125 320000 \
        --json "$RESULTS/model_$dtype.json" --plot "$RESULTS/model_$dtype.png" \
        | tee /dev/stderr | grep -v '^wrote ' > "$RESULTS/model_$dtype.txt"
done
# shellcheck disable=SC2086  # DTYPES is a list: one process runs each dtype in turn
"$PY" bench_refiner.py --dtype $DTYPES "$@"
# shellcheck disable=SC2086
"$PY" bench_ops.py --dtype $DTYPES "$@"
# The GPU targets against the results.
"$PY" verdict.py "${OUT_ARGS[@]}"
