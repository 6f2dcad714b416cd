"""Where the weights are: resolve a folder or a Hugging Face repo id to a complete local folder.

Searched in this order, each step logged:
1. the setting itself, when it names a folder;
2. Runpod's cached models (`/runpod-volume/huggingface-cache/hub`, Hugging Face cache layout);
3. a network volume (`/runpod-volume/models/<name>` or `/runpod-volume/<org>/<name>`);
4. the folder the Docker image bakes the weights into (`/models/<name>`);
5. the Hugging Face cache (`HF_HOME`), downloading only when `ZIMAGE_ALLOW_DOWNLOAD=1`.
Nothing here loads a weight; a missing or incomplete model raises `ModelNotFound` with
every place looked at, so the worker stops at start instead of failing each job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

HOW_TO_FIX = (
    "Bake the weights into the image (docker build, see README 'Deploy'), enable Runpod's cached "
    "model for the repo on the endpoint, mount a network volume holding the folder, or set {name} "
    "to a local diffusers folder (for a CPU try: python builder/tiny_model.py /tmp/tiny-zimage)."
)


class ModelNotFound(RuntimeError):
    """No complete model folder was found; the message says where we looked."""


@dataclass(frozen=True)
class SearchRoots:
    """The places searched besides the setting itself (tests point them at temporary folders)."""

    runpod_cache: Path = Path("/runpod-volume/huggingface-cache/hub")
    volume: Path = Path("/runpod-volume")
    baked: Path = Path("/models")
    hf_cache: Path | None = None  # None: huggingface_hub's own default (HF_HOME)
    allow_download: bool = False


def resolve_model(
    setting: str, check: Callable[[Path], list[str]], env_name: str, roots: SearchRoots | None = None
) -> Path:
    """The first complete folder for `setting`; `check` lists what a folder lacks."""
    roots = roots or SearchRoots()
    looked: list[str] = []
    for where, folder in _candidates(setting, roots):
        if folder is None or not folder.is_dir():
            looked.append(f"{where}: not there")
            log.info("model %s: %s: not there", setting, where)
            continue
        missing = check(folder)
        if not missing:
            log.info("model %s: using %s (%s)", setting, folder, where)
            return folder
        looked.append(f"{where} ({folder}): incomplete, missing {', '.join(missing)}")
        log.warning("model %s: %s is incomplete: missing %s", setting, folder, ", ".join(missing))
    raise ModelNotFound(
        f"{env_name}: no complete model for {setting!r}. Looked in: "
        + "; ".join(looked)
        + ". "
        + HOW_TO_FIX.format(name=env_name)
    )


def _candidates(setting: str, roots: SearchRoots):
    path = Path(setting).expanduser()
    if path.is_absolute() or setting.startswith(".") or path.is_dir() or setting.count("/") != 1:
        yield "the folder named by the setting", path
        return
    name = setting.split("/")[1]
    yield "Runpod cached models", _hf_snapshot(setting, roots.runpod_cache, download=False)
    yield "network volume", roots.volume / "models" / name
    yield "network volume", roots.volume / setting
    yield "weights baked into the image", roots.baked / name
    yield "Hugging Face cache", _hf_snapshot(setting, roots.hf_cache, download=roots.allow_download)


def _hf_snapshot(repo_id: str, cache_dir: Path | None, download: bool) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if cache_dir is not None and not cache_dir.is_dir():
        return None
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=not download))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def missing_pipeline_files(folder: Path) -> list[str]:
    """What a diffusers pipeline folder lacks: model_index.json and each component's files."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return ["model_index.json"]
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return ["a readable model_index.json"]
    missing = []
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list):
            continue
        sub = folder / component
        if component == "tokenizer":
            needed = ["tokenizer_config.json"]
        elif component == "scheduler":
            needed = ["scheduler_config.json"]
        else:
            needed = ["config.json"]
            if not any(sub.glob("*.safetensors")):
                missing.append(f"{component}/*.safetensors")
        missing += [f"{component}/{name}" for name in needed if not (sub / name).is_file()]
    return missing


def missing_classifier_files(folder: Path) -> list[str]:
    """What a transformers image-classification folder lacks."""
    needed = ["config.json", "preprocessor_config.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    return missing
