#!/usr/bin/env bash
# Where torch's CPU build comes from, as installer arguments: PyPI has only the CUDA build.
# A folder of wheels named by PIP_FIND_LINKS (or TORCH_CPU_WHEELS) that holds the pinned
# build wins, so an offline or mirrored machine never waits on an index it cannot reach;
# otherwise PyTorch's CPU index (TORCH_INDEX overrides it).
set -euo pipefail
for folder in ${TORCH_CPU_WHEELS:-} ${PIP_FIND_LINKS:-}; do
  if compgen -G "$folder/torch-2.13.0+cpu-*.whl" >/dev/null; then
    echo "--find-links $folder"
    exit 0
  fi
done
echo "--extra-index-url ${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
