"""CONTROLNET_MODEL: find Z-Image-Turbo Fun ControlNet Union and load it at start, beside the transformer;
TILE_CONTROLNET_MODEL (the Tile 2.1 release: Union 2.1's architecture) is found and loaded the same way.

The setting names a diffusers folder (config.json + safetensors), alibaba-pai's single `.safetensors`
release (a file, or a folder holding it; src/control/configs.py supplies its config), or a repo id
looked up in the same places as ZIMAGE_MODEL (src/model/files.py): `Org/Name` takes the release named
after the repo (`Name.safetensors`), `Org/Name/file.safetensors` another one. alibaba-pai's repos hold
several releases of 3 to 6.7 GB each, so a download (ZIMAGE_ALLOW_DOWNLOAD=1) fetches that one release
and a diffusers folder's files, never the others. Missing, corrupt or mismatched weights raise
`ModelNotFound` saying where it looked, so the worker stops at start.

The loaded model holds only the control blocks; the pipelines hand it the transformer's embedders and
refiners (`ZImageControlNetModel.from_transformer`), so nothing is loaded twice.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from src.control.configs import BODY_KEYS, KEY_ANY, detect_version, release_config
from src.model.files import (
    HOW_TO_FIX,
    ModelNotFound,
    SearchRoots,
    is_repo_id,
    load_failure,
    missing_weights,
    resolve_model,
)

log = logging.getLogger(__name__)

# The setting a ControlNet comes from: the Union (control) by default, TILE_CONTROLNET_MODEL for upscaling.
NAME = "CONTROLNET_MODEL"
# What a diffusers-format ControlNet repo holds (ZImageControlNetModel.save_pretrained's names).
DIFFUSERS_FILES = ["config.json", "diffusion_pytorch_model*.safetensors", "*.safetensors.index.json"]


def missing_controlnet_files(folder: Path) -> list[str]:
    """What a ControlNet folder lacks: a diffusers folder's files, or at least one single-file release."""
    if (folder / "config.json").is_file():
        return missing_weights(folder)
    if any(p.is_file() for p in folder.glob("*.safetensors")):
        return []
    return ["config.json and *.safetensors (a diffusers folder) or a single-file .safetensors release"]


def load_controlnet(
    setting: str,
    transformer: ZImageTransformer2DModel,
    dtype: torch.dtype,
    roots: SearchRoots | None = None,
    name: str = NAME,
) -> ZImageControlNetModel:
    """The ControlNet the setting `name` names, in `dtype`, checked to fit `transformer`."""
    where = find_controlnet(setting, roots, name)
    if where.is_dir() and (where / "config.json").is_file():
        controlnet, version = _from_folder(where, transformer.config, dtype, name), "diffusers folder"
    else:
        # Its body is the transformer's by construction (controlnet_configs.release_config).
        file = where if where.is_file() else _release_file(where, name)
        controlnet, version = load_release(file, transformer.config, dtype, name)
    log.info(
        "ControlNet %s (%s): control_in_dim %d, %d control layers",
        where,
        version,
        controlnet.config.control_in_dim,
        len(controlnet.config.control_layers_places),
    )
    return controlnet.eval()


def inpaints(controlnet: ZImageControlNetModel, transformer: ZImageTransformer2DModel) -> bool:
    """2.x takes the mask and masked image beside the control latents; 1.0 takes the control latents only."""
    return controlnet.config.control_in_dim > transformer.config.in_channels


def load_release(
    file: Path, transformer_config: Mapping[str, Any], dtype: torch.dtype, name: str = NAME
) -> tuple[ZImageControlNetModel, str]:
    """An alibaba-pai single-file release: its version from its keys, the config the worker ships."""
    try:
        state = load_file(file)
    except (OSError, SafetensorError) as err:
        raise _broken(file, err, name) from None
    version = detect_version(state)
    if version is None:
        sample = ", ".join(sorted(state)[:3]) or "no tensors"
        raise ModelNotFound(
            f"{name}: {file} is not a Z-Image-Turbo Fun ControlNet release: it has no {KEY_ANY} "
            f"(it holds {sample}, ...). Use alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union 1.0, 2.0 or "
            "2.1, or -Tile-2.1."
        )
    config = release_config(version, transformer_config)
    # Dropped as diffusers' convert_z_image_controlnet_checkpoint_to_diffusers drops them: 2.0 does not
    # use them. Cast here, so the model is made in `dtype` (no float32 copy on the way).
    drop = "control_noise_refiner." if config["add_control_noise_refiner"] == "control_layers" else None
    state = {key: value.to(dtype) for key, value in state.items() if drop is None or not key.startswith(drop)}
    with torch.device("meta"):
        controlnet = ZImageControlNetModel(**config)
    try:
        controlnet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        cause = " ".join(str(err).split())[:300]
        raise ModelNotFound(
            f"{name}: {file} looks like release {version} but its tensors do not fit that layout "
            f"with ZIMAGE_MODEL's transformer ({cause}). Use a release for Z-Image-Turbo, downloaded whole."
        ) from None
    return controlnet, version


def download_patterns(repo_id: str, file: str | None = None) -> list[str]:
    """The files a download of a ControlNet repo fetches: one release (`file`, else the one named
    after the repo) and a diffusers folder's files; alibaba-pai's other releases stay on the Hub."""
    return [file or f"{repo_id.split('/')[1]}.safetensors", *DIFFUSERS_FILES]


def repo_and_file(setting: str) -> tuple[str, str] | None:
    """`Org/Name/file.safetensors` that is not a path here -> ("Org/Name", "file.safetensors")."""
    repo, _, file = setting.rpartition("/")
    if file.endswith(".safetensors") and not Path(setting).expanduser().exists() and is_repo_id(repo):
        return repo, file
    return None


def find_controlnet(setting: str, roots: SearchRoots | None, name: str = NAME) -> Path:
    named = repo_and_file(setting)
    if named is not None:
        repo, file = named
        folder = resolve_model(repo, lambda f: [] if (f / file).is_file() else [file], name, roots, [file])
        return folder / file
    path = Path(setting).expanduser()
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise ModelNotFound(
                f"{name}: no file at {path}. Looked in: the file named by the setting. "
                + HOW_TO_FIX.format(name=name)
            )
        return path
    patterns = download_patterns(setting) if is_repo_id(setting) else None
    return resolve_model(setting, missing_controlnet_files, name, roots, patterns)


def _release_file(folder: Path, name: str) -> Path:
    """The one release in a folder; with several, the one named after the folder (a repo's snapshot)."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(files) == 1:
        return files[0]
    named = [p for p in files if p.stem == folder.name or p.stem == folder.parent.parent.name.split("--")[-1]]
    if len(named) == 1:
        return named[0]
    raise ModelNotFound(
        f"{name}: {folder} holds several releases ({', '.join(p.name for p in files)}): "
        "set {name} to the path of the one to load"
    )


def _from_folder(
    folder: Path, transformer_config: Mapping[str, Any], dtype: torch.dtype, name: str
) -> ZImageControlNetModel:
    try:
        config = ZImageControlNetModel.load_config(folder)
    except (OSError, ValueError) as err:
        raise _broken(folder, err, name) from None
    _check_fits(config, transformer_config, folder, name)
    try:
        return ZImageControlNetModel.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True
        )
    except (OSError, ValueError, SafetensorError, RuntimeError) as err:
        raise _broken(folder, err, name) from None


def _check_fits(
    config: Mapping[str, Any], transformer_config: Mapping[str, Any], where: Path, name: str
) -> None:
    """A folder made for another transformer would not load, or fail in the first job: said plainly first."""
    wrong = [
        f"{key} {_listed(config.get(key))} (the transformer's: {_listed(transformer_config[key])})"
        for key in BODY_KEYS
        if _listed(config.get(key)) != _listed(transformer_config[key])
    ]
    if wrong:
        raise ModelNotFound(
            f"{name}: {where} does not fit ZIMAGE_MODEL's transformer: {'; '.join(wrong)}. "
            "Use the Z-Image-Turbo Fun ControlNet made for this model."
        )


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _broken(where: Path, err: Exception, name: str) -> ModelNotFound:
    return ModelNotFound(
        f"{name}: {where} is there but cannot be loaded ({load_failure(err)}). "
        "A file in it is truncated or corrupt: download or copy the weights again."
    )


def bound_to(controlnet: ZImageControlNetModel, transformer: torch.nn.Module) -> ZImageControlNetModel:
    """The same control weights, wired to another transformer's embedders and refiners.

    The Fun ControlNet Union runs the transformer's own embedders and refiners (`from_transformer`);
    the base model's differ from Turbo's. A shallow copy with its own module and parameter tables
    shares every control block (no second copy of the ControlNet's weights), and
    `from_transformer` then points the copy, and only the copy, at `transformer`'s.
    """
    view = copy.copy(controlnet)
    view._modules = dict(controlnet._modules)
    view._parameters = dict(controlnet._parameters)
    view._buffers = dict(controlnet._buffers)
    return ZImageControlNetModel.from_transformer(view, transformer)
