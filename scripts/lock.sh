#!/usr/bin/env bash
# Re-lock every dependency, transitive ones included, each pinned with its hashes. Run it after
# editing requirements.txt or requirements-dev.txt and commit what it writes under locks/:
#
#   locks/dev-cpu.txt      set-up and CI (scripts/setup.sh): the worker, tests and lint, CPU torch
#   locks/worker-cpu.txt   the worker alone with CPU torch (tests/test_locks.py installs it fresh)
#   locks/worker-cuda.txt  the Docker image: the worker with PyPI's CUDA torch, for Python 3.12
#   locks/fp8-cuda.txt     the Docker image's torchao, for ZIMAGE_PRECISION=fp8 only
#
# The three share every version they have in common: the worker locks are resolved under the
# dev lock's pins. Extra uv arguments pass through (e.g. --upgrade-package diffusers).
set -euo pipefail
cd "$(dirname "$0")/.."
# uv is pinned in the dev lock; set-up installs it.
[ -x .venv/bin/uv ] || bash scripts/setup.sh
UV=(.venv/bin/uv pip compile --quiet --generate-hashes --custom-compile-command "bash scripts/lock.sh")
# The CPU locks: CPython 3.11 on Linux x86_64 (CI's machine). torch's CPU build is not on PyPI.
CPU=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match)
CPU+=($(bash scripts/torch-cpu-source.sh))
overrides=$(mktemp) && constraints=$(mktemp) && trap 'rm -f "$overrides" "$constraints"' EXIT
echo "torch==2.13.0+cpu" >"$overrides"

"${UV[@]}" "${CPU[@]}" --override "$overrides" requirements-dev.txt -o locks/dev-cpu.txt "$@"
# Every pin of the dev lock except torch, whose build differs between the locks.
grep -E '^[A-Za-z0-9_.-]+==' locks/dev-cpu.txt | sed 's/ .*//' | grep -v '^torch==' >"$constraints"
"${UV[@]}" "${CPU[@]}" --override "$overrides" -c "$constraints" requirements.txt -o locks/worker-cpu.txt "$@"
"${UV[@]}" --python-version 3.12 --python-platform x86_64-manylinux_2_28 -c "$constraints" \
  requirements.txt -o locks/worker-cuda.txt "$@"
# Installed apart in the image (pip --target): installed beside diffusers, torchao would be imported
# by diffusers' quantizer checks on every start; only ZIMAGE_PRECISION=fp8 puts it on the path.
"${UV[@]}" --python-version 3.12 --python-platform x86_64-manylinux_2_28 -c "$constraints" \
  requirements-fp8.txt -o locks/fp8-cuda.txt "$@"
# The annotations name the temporary files; give them stable names so a re-lock diffs cleanly.
sed -i -e "s#$overrides#torch==2.13.0+cpu#" -e "s#$constraints#locks/dev-cpu.txt#" locks/*.txt
echo "locked: $(ls locks/*.txt | tr '\n' ' ')"
