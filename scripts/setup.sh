#!/usr/bin/env bash
# Create .venv and install locks/dev-cpu.txt into it: every package the worker, the tests and
# lint use, transitive ones included, each at its locked version and checked against its
# hashes (torch is the CPU build). Safe to run again: pip skips what is already installed.
# The lock is written by `bash scripts/lock.sh`, never by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC2046  # the torch source is two words: a flag and its value
.venv/bin/python -m pip install --quiet --require-hashes --no-deps -r locks/dev-cpu.txt \
  $(bash scripts/torch-cpu-source.sh)
