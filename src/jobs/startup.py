"""The cold start, one function per part, each called in order and timed by `Worker.start`.

Every part runs on the GPU thread (src/runtime/gpu.py), as every later torch op does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ZImageControlNetModel, ZImagePipeline

from src.control.controlnet import bound_to, load_controlnet
from src.control.pose import PoseEstimator
from src.control.preprocess import DepthEstimator
from src.lora.adapters import LoraAdapters
from src.lora.files import LoraFiles
from src.model.acceleration import COMPILED_NOTE
from src.model.expander import PromptExpander
from src.model.expander_weights import load_expander_model, missing_expander_files
from src.model.files import SearchRoots, missing_classifier_files, resolve_model
from src.model.pipeline import ZImageGenerator
from src.model.safety import SafetyChecker
from src.runtime.settings import Settings
from src.runtime.timing import Stopwatch

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """One model of the family (src/request/models.py) as this worker serves it."""

    generator: ZImageGenerator
    loras: LoraAdapters


def compiles(settings: Settings, device: torch.device) -> bool:
    """Whether `accelerate` compiles the transformer (it does on CUDA only)."""
    return settings.compile and device.type == "cuda"


@dataclass
class ControlModels:
    """The ControlNet and the preprocessors that run on the device beside it; None where off."""

    controlnet: ZImageControlNetModel | None = None
    depth: DepthEstimator | None = None
    pose: PoseEstimator | None = None


def load_control_models(
    settings: Settings,
    transformer: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    roots: SearchRoots,
) -> ControlModels:
    """The ControlNet, built on the first model's transformer, and the depth and pose models beside it."""
    if not settings.control_enabled:
        return ControlModels()
    controlnet = load_controlnet(settings.controlnet_model, transformer, dtype, roots).to(device)
    depth = pose = None
    if settings.depth_enabled:
        folder = resolve_model(settings.depth_model, missing_classifier_files, "DEPTH_MODEL", roots)
        depth = DepthEstimator.load(folder, device, dtype)
    if settings.pose_enabled:
        pose_folder = resolve_model(settings.pose_model, missing_classifier_files, "POSE_MODEL", roots)
        detector = resolve_model(
            settings.pose_detector_model, missing_classifier_files, "POSE_DETECTOR_MODEL", roots
        )
        pose = PoseEstimator.load(pose_folder, detector, device, dtype)
    return ControlModels(controlnet, depth, pose)


def serve_models(
    settings: Settings,
    pipes: dict[str, ZImagePipeline],
    controlnet: ZImageControlNetModel | None,
    device: torch.device,
    clock: Stopwatch,
) -> dict[str, ServedModel]:
    """Each loaded pipeline on the device, with its mode views, LoRA adapters and speed-ups."""
    files = LoraFiles(
        settings.lora_dirs, settings.lora_cache_path, settings.lora_cache_gb, settings.lora_max_mb
    )
    first = next(iter(pipes))
    models: dict[str, ServedModel] = {}
    for name, pipe in pipes.items():
        # One prompt cache for the models that share one text encoder.
        shared_prompts = next(
            (m.generator.prompts for m in models.values() if m.generator.text_encoder is pipe.text_encoder),
            None,
        )
        pipe = pipe.to(device)
        clock.lap("move_to_device")
        # The ControlNet was trained on Turbo; another model gets a view of the same weights
        # wired to its own transformer's embedders (src/control/controlnet.py).
        control = (
            controlnet if controlnet is None or name == first else bound_to(controlnet, pipe.transformer)
        )
        generator = ZImageGenerator(pipe, device, control, prompts=shared_prompts)
        # Before `accelerate`: a transformer about to be compiled gets its LoRA slots first.
        hotswap = compiles(settings, device)
        loras = LoraAdapters(generator.text_to_image, files, settings.lora_max_loaded, hotswap=hotswap)
        generator.accelerate(settings.precision, settings.compile)
        if generator.compiled:
            log.warning("%s, ZIMAGE_COMPILE=1: %s", name, COMPILED_NOTE)
        models[name] = ServedModel(generator, loras)
        clock.lap("accelerate")
    return models


def load_safety(
    settings: Settings, roots: SearchRoots, device: torch.device, dtype: torch.dtype
) -> SafetyChecker | None:
    if not settings.safety_enabled:
        log.warning("SAFETY_CHECKER_MODEL=none: images are returned without any content check")
        return None
    folder = resolve_model(
        settings.safety_checker_model, missing_classifier_files, "SAFETY_CHECKER_MODEL", roots
    )
    return SafetyChecker.load(folder, settings.safety_threshold, device, dtype)


def load_expander(
    settings: Settings, roots: SearchRoots, models: dict[str, ServedModel]
) -> PromptExpander | None:
    """The prompt expander, sharing every tensor it has in common with the loaded text encoder."""
    if not settings.expansion_enabled:
        return None
    folder = resolve_model(
        settings.prompt_expander_model, missing_expander_files, "PROMPT_EXPANDER_MODEL", roots
    )
    encoder = next(iter(models.values())).generator.text_encoder
    encoder_folder = Path(encoder.name_or_path)  # diffusers loads it from <model>/text_encoder
    model = load_expander_model(folder, encoder, encoder_folder if encoder_folder.is_dir() else None)
    return PromptExpander.load(folder, model, settings.prompt_expander_model)


def warm_up(settings: Settings, models: dict[str, ServedModel]) -> None:
    for served in models.values():
        served.generator.warm_up(compiled=settings.compile, lora_slots=served.loras.slots)
