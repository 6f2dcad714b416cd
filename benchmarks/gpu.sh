#!/usr/bin/env bash
# Every GPU figure of the worker in one command of at most 8 minutes (docs/performance.md).
#
#   bash benchmarks/gpu.sh --prepare [DIR]  # here, with PyPI: the wheels the GPU machine lacks (.whl)
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root, offline
#   bash benchmarks/gpu.sh --tiny           # the same sections on the CPU with the tiny model
#
# Results go to $OUT (else benchmarks/results/): gpu-results.jsonl, gpu-results.md, gpu-log.txt.
# PYTHON picks the interpreter (python3: on the GPU machine, the one that has torch);
# GPU_BENCH_WHEELS the wheel folder (.whl); the rest is in benchmarks/gpu/bench.py.
set -uo pipefail
cd "$(dirname "$0")/.."
# The 8 minutes count from here: the wheel install is part of them.
export GPU_BENCH_T0="${GPU_BENCH_T0:-$(date +%s.%N)}"
PY="${PYTHON:-python3}"
WHEELS="${GPU_BENCH_WHEELS:-.whl}"

case "${1:-}" in
  --prepare) exec "$PY" benchmarks/gpu/wheels.py prepare "${2:-$WHEELS}" ;;
  --tiny) export GPU_BENCH_TINY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu.sh [--prepare [DIR] | --tiny]" >&2; exit 2 ;;
esac

# Nothing outside the GPU machine can be reached; the model is built locally.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE="${GPU_BENCH_SITE:-/tmp/zimage-bench-site}"
  # --target on PYTHONPATH, --no-deps: the machine's own torch is never replaced.
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" benchmarks/gpu/wheels.py install "$WHEELS" "$SITE" \
    || echo "wheel install failed; the machine section shows which imports fail" >&2
fi
exec "$PY" benchmarks/gpu/bench.py
