#!/usr/bin/env bash
# The README's main job (data/run_default.py): cache the bundled MNIST-1D teachers once over the labelled rows and
# a transfer set, train the same MLP from scratch, with KD, with KD + transfer set and from an ensemble of the two
# teachers, then print a table and write a `pipeline report`. `--quiet` prints the table only.
# Caches go to $KD_CACHE_DIR (default .kd-cache/ here), runs to $KD_RUNS_DIR/default (default runs/default).
# Re-running reuses the caches: the teachers run only the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's stages/ and pipeline/, whatever else is installed
exec "${PYTHON:-python3}" data/run_default.py "$@"
