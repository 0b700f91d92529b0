#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite:
#   bash tests/run.sh [extra pytest arguments]
# Installs torch (only if none is installed), the build, test and command-line
# dependencies and upstream's package (the oracle), installs pymatting_ext from
# this checkout (CUDA sources too where a toolkit is found; the extension is
# compiled only when the installed one was not built from the same sources and
# settings, see tests/install.sh), then runs pytest against the installed
# package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Dependencies, then this checkout's pymatting_ext (compiled only when the
# installed build does not match the checkout; see tests/install.sh).
bash tests/install.sh

# From inside tests/, so that `import pymatting_ext` is the installed package,
# not the source folder.
cd tests
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
