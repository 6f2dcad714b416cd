#!/usr/bin/env bash
# Create .venv with the CPU build of torch and every pinned dependency (tests included).
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Pinned torch first: an unpinned one would pull several GB of CUDA packages. Where PyPI
# only has the CUDA build, set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
.venv/bin/pip install --quiet "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
.venv/bin/pip install --quiet -r requirements-dev.txt
