#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite:
#   bash tests/run.sh [extra pytest arguments]
# Installs torch (only if none is installed), the build and test dependencies
# and upstream's package (the oracle), builds and installs pymatting_ext from
# this checkout (CUDA sources too where a toolkit is found), then runs pytest
# against the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PY" -m pip install -q ninja pybind11 pytest hypothesis "backgroundmattingv2==1.0"
# Triton comes with torch's CUDA wheels; install it only where it is missing
# (an unpinned install next to torch's pinned one could replace it).
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install -q triton
"$PY" -m pip install -q --no-deps --no-build-isolation --force-reinstall -v . > build.log 2>&1 \
    || { tail -n 60 build.log; exit 1; }
# What was built (from outside the source tree, so the installed copy loads).
(cd / && "$PY" -c "import pymatting_ext, pprint; pprint.pprint(pymatting_ext.build_info())")

# From inside tests/, so that `import pymatting_ext` is the installed package,
# not the source folder.
cd tests
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
