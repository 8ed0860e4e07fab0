#!/usr/bin/env bash
# Creates .venv with the CPU build of torch, the package, its test tools (pytest, Triton) and the 0.5B preset.
# Usage: bash scripts/setup.sh [extras]   (default extras: qwen-0-5b,test; add qwen-1-5b for the 1.5B preset)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-qwen-0-5b,test}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU wheel of torch, from the indexes and wheel folders pip is set up with, else from PyTorch's CPU index
# (tried second: where it is out of reach, pip would retry it for every package); a bare `torch` requirement
# would pull a multi-GB CUDA build from PyPI.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet torch==2.13.0+cpu 2>/dev/null \
        || .venv/bin/python -m pip install --quiet torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
