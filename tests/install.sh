#!/usr/bin/env bash
# The set-up that tests/run.sh and benchmarks/run.sh share:
#   bash tests/install.sh
# Installs torch (only if none is installed), the build and test
# dependencies, upstream's package (the oracle), the command line's and the
# exporters' dependencies (setup.py's extras `cli` and `export`), then this
# checkout's pymatting_ext. Its C++/CUDA extension is compiled only when the
# installed pymatting_ext was not built from the same sources and settings:
# setup.py records a hash of those at build time and, when the installed
# build's hash matches the checkout's, copies that build instead of
# compiling (a line of build.log says which it did); the Python files are
# installed from the checkout every time. PYMATTING_EXT_REUSE=0 forces a
# compile.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -q ninja pybind11 pytest hypothesis "backgroundmattingv2==1.0"
# setup.py's extras cli (PyAV, tqdm, Pillow, matplotlib, OpenCV) and export
# (onnx, onnxruntime, onnxscript), named here because the package is installed
# with --no-deps (so that pip never replaces the torch it is built against).
"$PY" -m pip install -q av tqdm pillow matplotlib numpy opencv-python-headless onnx onnxruntime onnxscript
# Triton comes with torch's CUDA wheels; install it only where it is missing
# (an unpinned install next to torch's pinned one could replace it).
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton
start=$SECONDS
"$PY" -m pip install --no-deps --no-build-isolation --force-reinstall -v . > build.log 2>&1 \
    || { tail -n 60 build.log; exit 1; }
echo "pip install of this checkout: $((SECONDS - start)) s; $(grep -m1 -o 'pymatting_ext extension: .*' build.log || echo 'see build.log')"
# What was built (from outside the source tree, so the installed copy loads).
(cd / && "$PY" -c "import pymatting_ext, pprint; pprint.pprint(pymatting_ext.build_info())")
