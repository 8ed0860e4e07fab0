#!/usr/bin/env bash
# Fetches into .whl (git-ignored) the wheels bench/gpu.sh installs on a lent GPU machine, which has torch, triton and
# transformers for CPython 3.12 but not these, and cannot reach a package index: zarr, numcodecs, donfig,
# google-crc32c and py-spy. Run it where an index answers; the device call then carries .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 py-spy==0.4.3
ls .whl
