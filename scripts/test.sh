#!/usr/bin/env bash
# Set up, then lint and run every test on the CPU. Fails on any failure and on no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Three test processes, a test file to each (pytest-xdist): while one waits on a worker process, a
# server or a time cap, the others use the two cores. The files go out in tests/conftest.py's
# order, the slowest first (xdist's default reorders them by their number of tests).
.venv/bin/pytest -n 3 --dist loadfile --no-loadscope-reorder "$@"
