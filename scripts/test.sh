#!/usr/bin/env bash
# Set up, then lint and run every test on the CPU. Fails on any failure and on no tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# Two test processes, a test file to each (pytest-xdist): the suite takes about half the time.
.venv/bin/pytest -n 2 --dist loadfile "$@"
