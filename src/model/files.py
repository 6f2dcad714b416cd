"""Where the weights are: resolve a folder or a Hugging Face repo id to a complete local folder.

Searched in this order, each step logged:
1. the setting itself, when it names a folder (an absolute or ./relative path, or an existing folder);
2. Runpod's cached models (`/runpod-volume/huggingface-cache/hub`, Hugging Face cache layout);
3. a network volume (`/runpod-volume/models/<name>` or `/runpod-volume/<org>/<name>`);
4. the folder the Docker image bakes the weights into (`/models/<name>`);
5. the Hugging Face cache (`HF_HUB_CACHE`), downloading only when `ZIMAGE_ALLOW_DOWNLOAD=1`.
Nothing here loads a weight; a missing or incomplete model raises `ModelNotFound` with
every place looked at, so the worker stops at start instead of failing each job.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOW_TO_FIX = (
    "Bake the weights into the image (docker build, see docs/deploy.md), enable Runpod's cached "
    "model for the repo on the endpoint, mount a network volume holding the folder, or set {name} "
    "to a local diffusers folder (for a CPU try: python builder/tiny_model.py /tmp/tiny-zimage)."
)
# Formats the worker never loads (it reads safetensors only): a runtime download skips them,
# which for some repos halves the bytes and keeps pickles off the machine. The same list is
# builder/download_weights.py's NEVER (that script imports nothing from src/, so the Docker
# weights layer does not depend on the code); tests/test_model_files.py keeps them equal.
NOT_NEEDED = [
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.pkl",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.msgpack",
    "*.h5",
]


class ModelNotFound(RuntimeError):
    """No complete model folder was found; the message says where we looked."""


def load_failure(err: Exception) -> str:
    """Why a complete-looking folder did not load, short enough for a start-up message:
    the error's type and the first line of its text."""
    cause = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {cause}"


def load_vision_model(
    model_class: Any, folder: Path, device: Any, dtype: Any, setting: str, turn_off: str
) -> tuple[Any, Any]:
    """A transformers vision model (safetensors only) and its image processor from a local folder,
    on `device` in eval mode; a folder that does not load stops the worker naming `setting`, with
    `turn_off` (the setting that turns the feature off) as the way out."""
    from transformers import AutoImageProcessor

    try:
        # B615 (no revision pinned) does not apply: a local folder, local_files_only=True.
        model = model_class.from_pretrained(  # nosec B615
            folder, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)  # nosec B615
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"{setting}: {folder} is there but cannot be loaded ({load_failure(err)}); download the "
            f"model again, or set {turn_off}"
        ) from None
    return model.to(device).eval(), processor


@dataclass(frozen=True)
class SearchRoots:
    """The places searched besides the setting itself (tests point them at temporary folders)."""

    runpod_cache: Path = Path("/runpod-volume/huggingface-cache/hub")
    volume: Path = Path("/runpod-volume")
    baked: Path = Path("/models")
    hf_cache: Path | None = None  # None: huggingface_hub's own default (HF_HUB_CACHE)
    allow_download: bool = False  # Settings.allow_download (ZIMAGE_ALLOW_DOWNLOAD)
    hub_endpoint: str | None = None  # None: HF_ENDPOINT or huggingface.co


def resolve_model(
    setting: str,
    check: Callable[[Path], list[str]],
    env_name: str,
    roots: SearchRoots | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """The first complete folder for `setting`; `check` lists what a folder lacks.

    `allow_patterns` limits a download to those files (None: every file but NOT_NEEDED).
    """
    roots = roots or SearchRoots()
    looked: list[str] = []
    for where, folder in _candidates(setting, roots):
        if not folder.is_dir():
            looked.append(f"{where} ({folder}): not there")
            log.info("model %s: %s (%s): not there", setting, where, folder)
            continue
        missing = check(folder)
        if not missing:
            log.info("model %s: using %s (%s)", setting, folder, where)
            return folder
        looked.append(f"{where} ({folder}): incomplete, missing {', '.join(missing)}")
        log.warning("model %s: %s is incomplete: missing %s", setting, folder, ", ".join(missing))
    if is_repo_id(setting):
        downloaded, note = _download(setting, roots, check, allow_patterns)
        if downloaded is not None:
            return downloaded
        looked.append(note)
    raise ModelNotFound(
        f"{env_name}: no complete model for {setting!r}. Looked in: "
        + "; ".join(looked)
        + ". "
        + HOW_TO_FIX.format(name=env_name)
    )


def is_repo_id(setting: str) -> bool:
    """'Org/Name' that is not a path: an absolute, ./relative or existing folder is taken as a folder."""
    path = Path(setting).expanduser()
    return not (path.is_absolute() or setting.startswith(".") or path.is_dir()) and setting.count("/") == 1


def _candidates(setting: str, roots: SearchRoots) -> Iterator[tuple[str, Path]]:
    if not is_repo_id(setting):
        yield "the folder named by the setting", Path(setting).expanduser()
        return
    name = setting.split("/")[1]
    yield from (("Runpod cached models", s) for s in hf_cache_snapshots(setting, roots.runpod_cache))
    yield "network volume", roots.volume / "models" / name
    yield "network volume", roots.volume / setting
    yield "weights baked into the image", roots.baked / name
    yield from (("Hugging Face cache", s) for s in hf_cache_snapshots(setting, _hf_cache(roots)))


def _hf_cache(roots: SearchRoots) -> Path:
    if roots.hf_cache is not None:
        return roots.hf_cache
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_cache_snapshots(repo_id: str, cache: Path) -> list[Path]:
    """The snapshot folders of `repo_id` in a Hugging Face cache, the one `refs/main` names first.

    Read directly rather than through `snapshot_download(local_files_only=True)`: Runpod's
    cache is documented only as `models--Org--Name/snapshots/<hash>/`, and a cache filled
    at a pinned revision has no `refs/main`; every snapshot is then tried, newest first.
    With no snapshot at all, the repo folder itself is returned so the message shows it.
    """
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    found = sorted(
        (s for s in snapshots.iterdir() if s.is_dir()) if snapshots.is_dir() else [],
        key=lambda s: s.stat().st_mtime,
        reverse=True,
    )
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        if main in found:
            found.remove(main)
            found.insert(0, main)
    return found or [repo_dir]


def _download(
    setting: str, roots: SearchRoots, check: Callable[[Path], list[str]], allow_patterns: list[str] | None
) -> tuple[Path | None, str]:
    """Fetch into the Hugging Face cache when allowed; (folder, "") or (None, why not)."""
    if not roots.allow_download:
        return None, "download from Hugging Face: off (set ZIMAGE_ALLOW_DOWNLOAD=1 to allow it)"
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if constants.HF_HUB_OFFLINE:  # the image sets it; name it rather than report a bare failure
        return None, "download from Hugging Face: ZIMAGE_ALLOW_DOWNLOAD=1 but HF_HUB_OFFLINE=1 forbids it"
    log.info("model %s: downloading from Hugging Face (ZIMAGE_ALLOW_DOWNLOAD=1)", setting)
    try:
        # B615 (no revision pinned) on purpose: an opt-in fetch of the repo the operator named; only
        # safetensors and configs come down (NOT_NEEDED) and load, so no revision can run code.
        snapshot = snapshot_download(  # nosec B615
            setting,
            cache_dir=roots.hf_cache,
            allow_patterns=allow_patterns,
            ignore_patterns=NOT_NEEDED,
            endpoint=roots.hub_endpoint,
        )
        folder = Path(snapshot)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        return None, f"download from Hugging Face: failed ({type(err).__name__})"
    missing = check(folder)
    if missing:
        return None, f"download from Hugging Face ({folder}): incomplete, missing {', '.join(missing)}"
    log.info("model %s: using %s (downloaded)", setting, folder)
    return folder, ""


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
        # [null, null] marks an optional component the pipeline was saved without.
        if component.startswith("_") or not isinstance(spec, list) or None in spec:
            continue
        sub = folder / component
        if component == "tokenizer":
            needed = ["tokenizer_config.json"]
        elif component == "scheduler":
            needed = ["scheduler_config.json"]
        else:
            needed = ["config.json"]
            missing += [f"{component}/{name}" for name in missing_weights(sub)]
        missing += [f"{component}/{name}" for name in needed if not (sub / name).is_file()]
    return missing


def missing_classifier_files(folder: Path) -> list[str]:
    """What a transformers image-classification folder lacks."""
    needed = ["config.json", "preprocessor_config.json"]
    return [name for name in needed if not (folder / name).is_file()] + missing_weights(folder)


def missing_weights(folder: Path) -> list[str]:
    """The safetensors a model folder lacks: every shard its index names, or at least one file.

    `is_file` follows symlinks, so a Hugging Face cache entry whose blob is gone counts as missing.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if not indexes:
        return [] if any(p.is_file() for p in folder.glob("*.safetensors")) else ["*.safetensors"]
    missing = []
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            missing.append(f"a readable {index.name}")
            continue
        missing += [shard for shard in sorted(shards) if not (folder / shard).is_file()]
    return missing
