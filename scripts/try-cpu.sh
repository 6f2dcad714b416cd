#!/usr/bin/env bash
# Set up, build a tiny random Z-Image model, run test_input.json (or --test_input '{...}') through
# handler.py on the CPU, and save the picture(s) under outputs/try-cpu/, printing their paths.
# The real weights need a GPU; the tiny model exercises every line of the worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${ZIMAGE_MODEL:-.cache/tiny-zimage}
[ -f "$MODEL/model_index.json" ] || .venv/bin/python builder/tiny_model.py "$MODEL"
ZIMAGE_MODEL="$MODEL" SAFETY_CHECKER_MODEL=${SAFETY_CHECKER_MODEL:-none} .venv/bin/python scripts/try_cpu.py "$@"
