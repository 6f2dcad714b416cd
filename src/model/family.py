"""The Z-Image family on one worker: each served model's pipeline, sharing what is the same.

Turbo and the base are the same architecture over the same Qwen3-4B text encoder, tokenizer and
FLUX VAE; only the transformer (and the scheduler's config) differ. Each model whose weights
setting is not "none" (src/request/models.py) is loaded; a later one takes the first one's text
encoder, tokenizer and VAE objects when its files are the same (by content), so both models
hold one copy of them and one prompt-embedding cache. Different files are loaded as their own,
and the log says which.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from diffusers import ZImagePipeline

from src.model.files import SearchRoots, missing_pipeline_files, resolve_model
from src.model.pipeline import load_pipeline
from src.request.models import MODELS
from src.runtime.settings import Settings

log = logging.getLogger(__name__)

SHAREABLE = ("text_encoder", "tokenizer", "vae")


def served_models(settings: Settings) -> list[str]:
    """The request names of the models this worker loads, in the table's order."""
    return [name for name, card in MODELS.items() if getattr(settings, card.settings_field).lower() != "none"]


def load_family(settings: Settings, roots: SearchRoots, dtype: torch.dtype) -> dict[str, ZImagePipeline]:
    """Every served model's text-to-image pipeline, on the CPU, sharing the components that match."""
    pipes: dict[str, ZImagePipeline] = {}
    first: Path | None = None
    for name in served_models(settings):
        card = MODELS[name]
        folder = resolve_model(
            getattr(settings, card.settings_field), missing_pipeline_files, card.weights_setting, roots
        )
        shared = {}
        if first is not None:
            reference = pipes[next(iter(pipes))]
            for component in SHAREABLE:
                if same_files(first / component, folder / component):
                    shared[component] = getattr(reference, component)
                else:
                    log.warning(
                        "%s: its %s differs from the first model's: loaded as its own", name, component
                    )
        pipes[name] = load_pipeline(folder, dtype, shared, card.weights_setting)
        log.info("%s from %s%s", name, folder, f" (sharing {', '.join(shared)})" if shared else "")
        first = first or folder
    return pipes


def same_files(a: Path, b: Path) -> bool:
    """Whether two folders hold the same file names with the same contents. A baked image links the
    base's shared components to Turbo's files (builder/download_weights.py): the same real file
    is the same content, and nothing is read."""
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if not names_a or names_a != names_b:
        return False
    return all(
        (a / name).resolve() == (b / name).resolve() or _digest(a / name) == _digest(b / name)
        for name in names_a
    )


def _digest(path: Path) -> tuple[int, str]:
    """(size, content hash). In a Hugging Face cache a file is a link to a blob named by its hash
    (sha256 for LFS weights, git's sha1 otherwise), so the multi-GB weights are not read."""
    real = path.resolve()
    if real.parent.name == "blobs" and len(real.name) in (40, 64):
        return real.stat().st_size, real.name
    digest = hashlib.sha256()
    with open(real, "rb") as file:
        while block := file.read(1 << 24):
            digest.update(block)
    return real.stat().st_size, digest.hexdigest()
