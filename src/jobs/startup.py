"""The cold start, one function per part, each called in order and timed by `Worker.start`.

Every part runs on the GPU thread (src/runtime/gpu.py), as every later torch op does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from diffusers import ZImageControlNetModel, ZImagePipeline

from src.control.controlnet import bound_to, load_controlnet
from src.control.pose import PoseEstimator
from src.control.preprocess import DepthEstimator
from src.lora.adapters import LoraAdapters
from src.lora.files import LoraFiles
from src.model import memory, placement
from src.model.acceleration import COMPILED_NOTE
from src.model.expander import PromptExpander
from src.model.expander_weights import load_expander_model, missing_expander_files
from src.model.files import SearchRoots, missing_classifier_files, resolve_model
from src.model.pipeline import ZImageGenerator
from src.model.placement import Placement, store_fp8
from src.model.residence import Residence
from src.model.safety import SafetyChecker
from src.request.schema import GenerateRequest
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
    # TILE_CONTROLNET_MODEL, for upscaling; loaded with or without the Union.
    tile_controlnet: ZImageControlNetModel | None = None


def load_control_models(
    settings: Settings,
    transformer: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    roots: SearchRoots,
) -> ControlModels:
    """The ControlNets, built on the first model's transformer, and the depth and pose models beside them."""
    tile = None
    if settings.tile_control_enabled:
        tile = load_controlnet(
            settings.tile_controlnet_model, transformer, dtype, roots, "TILE_CONTROLNET_MODEL"
        )
    if not settings.control_enabled:
        return ControlModels(tile_controlnet=tile)
    # In CPU memory until serve_models moves it, after the memory plan may have stored it in fp8.
    controlnet = load_controlnet(settings.controlnet_model, transformer, dtype, roots)
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
    return ControlModels(controlnet, depth, pose, tile)


def serve_models(
    settings: Settings,
    pipes: dict[str, ZImagePipeline],
    control: ControlModels,
    device: torch.device,
    clock: Stopwatch,
) -> dict[str, ServedModel]:
    """Each loaded pipeline on the device, with its mode views, LoRA adapters and speed-ups."""
    files = LoraFiles(
        settings.lora_dirs, settings.lora_cache_path, settings.lora_cache_gb, settings.lora_max_mb
    )
    first = next(iter(pipes))
    for loaded in (control.controlnet, control.tile_controlnet):
        if loaded is not None:
            loaded.to(device)
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
        union, tile = (
            (net if net is None or name == first else bound_to(net, pipe.transformer))
            for net in (control.controlnet, control.tile_controlnet)
        )
        parts = {"tile_controlnet": tile, "upscale_tile": settings.upscale_tile}
        generator = ZImageGenerator(pipe, device, union, prompts=shared_prompts, parts=parts)
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


def warm_up(models: dict[str, ServedModel]) -> None:
    # Every preset size only where the blocks are compiled: ZIMAGE_COMPILE=1 on a CPU compiles
    # nothing, and a warm-up over every size there would be seconds of nothing.
    for served in models.values():
        served.generator.warm_up(compiled=served.generator.compiled, lora_slots=served.loras.slots)


def weigh(
    settings: Settings, pipes: dict[str, ZImagePipeline], control: ControlModels, device: torch.device
) -> Weights:
    """The big parts measured while still in CPU memory. Where the plan will be `fp8` (the plan
    for these parts alone, which the small ones loaded later can only push further down the
    table), the transformers and ControlNet are stored in fp8 here, so a card that cannot hold
    them in bf16 never has to."""
    transformers = unique([pipe.transformer for pipe in pipes.values()])
    encoders = unique([pipe.text_encoder for pipe in pipes.values()])
    vaes = unique([pipe.vae for pipe in pipes.values()])
    tile = control.tile_controlnet
    parts = placement.measure(transformers, encoders, vaes, control.controlnet, tile_controlnet=tile)
    shapes = placement.shapes_of(transformers[0], vaes[0], encoders[0], control.controlnet, tile)
    budget, context = memory_budget(settings, device)
    job = placement.worst_job(settings.lora_max_loaded, settings.upscale_tile)
    early = memory.choose(settings.memory_plan, parts, shapes, budget, context, job)  # may refuse
    if early.plan.fp8:
        dtype = transformers[0].dtype
        for model in [*transformers, control.controlnet, tile]:
            if model is not None:
                store_fp8(model, dtype)
    return Weights(parts, shapes, budget, context, job)


@dataclass(frozen=True)
class Weights:
    parts: memory.Parts  # the transformers, text encoders, VAEs and ControlNets, as loaded
    shapes: memory.Shapes
    budget: float
    context: int
    job: memory.Job


def plan_memory(
    settings: Settings,
    weights: Weights,
    models: dict[str, ServedModel],
    control: ControlModels,
    safety: SafetyChecker | None,
    expander: PromptExpander | None,
) -> Placement:
    """The memory plan for this card and every loaded part (src/model/memory.py), put in place
    here (and in `weigh`) only: the job flow sees batches split and weights where the plan put them."""
    generators = [served.generator for served in models.values()]
    device = generators[0].device
    pipes = [generator.text_to_image for generator in generators]
    transformers = unique([pipe.transformer for pipe in pipes])
    encoders, vaes = unique([pipe.text_encoder for pipe in pipes]), unique([pipe.vae for pipe in pipes])
    pose = [control.pose.detector, control.pose.pose] if control.pose is not None else []
    others = [safety.model if safety else None, control.depth.model if control.depth else None, *pose]
    own_expander = expander.model if expander is not None else None
    more = placement.measure([], [], [], None, own_expander, others)
    parts = replace(weights.parts, expander=more.expander, others=more.others)
    shapes, budget, context, job = weights.shapes, weights.budget, weights.context, weights.job
    choice = memory.choose(settings.memory_plan, parts, shapes, budget, context, job)  # may refuse
    plan = choice.plan
    where = {"transformer": f"on {device.type}"}
    if plan.fp8:
        dtype = generators[0].text_to_image.transformer.dtype
        for model in [*transformers, control.controlnet, control.tile_controlnet]:
            if model is not None:
                store_fp8(model, dtype)  # those `weigh` did not store already
        cast = sum(placement.is_cast(layer) for model in transformers for layer in model.modules())
        kept = "norms, embedders, final layer as loaded"
        where["transformer"] += f", {cast} layers stored in fp8 ({kept})"
    for name, net in (("ControlNet", control.controlnet), ("Tile ControlNet", control.tile_controlnet)):
        if net is not None:
            where[name] = f"on {device.type}" + (", stored in fp8 likewise" if plan.fp8 else "")
    residence = Residence([*encoders, own_expander] if own_expander else encoders, device, plan.offloads)
    where["text encoder" + (" and expander" if expander else "")] = residence.where
    # The LoRA slots the plan keeps (LORA_MAX_LOADED, or fewer where that let an earlier plan fit).
    job = replace(job, loras=choice.lora_slots)
    for served in models.values():
        served.loras.max_loaded = min(settings.lora_max_loaded, choice.lora_slots)
    for generator in generators:
        generator.prompts.residence = residence
        if plan.splits:
            generator.largest_batch = partial(batch_for, plan, parts, shapes, job, budget - context)
        if plan.slices:
            generator.tile_above = memory.TILE_ABOVE
    if expander is not None and plan.offloads:
        expander.offload(residence)
    for vae in vaes if plan.slices else []:
        vae.enable_slicing()
        vae.tile_sample_min_size = memory.TILE_PIXELS
        vae.tile_latent_min_size = memory.TILE_PIXELS // shapes.vae_scale
    where["VAE"] = f"on {device.type}" + (", one image at a time, tiled above 1 MP" if plan.slices else "")
    placed = Placement(choice, budget, where, parts, shapes)
    (log.info if choice.fits else log.warning)("%s", placed.line)
    return placed


def unique(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    return list({id(module): module for module in modules}.values())


def memory_budget(settings: Settings, device: torch.device) -> tuple[float, int]:
    """GPU_MEMORY_GB in bytes (default: the GPU's total; without CUDA, no limit), and the part of
    it the CUDA context and other processes hold already (torch's own allocations apart)."""
    if device.type != "cuda":
        budget = math.inf if settings.gpu_memory_gb is None else settings.gpu_memory_gb * memory.GB
        return budget, 0
    free, total = torch.cuda.mem_get_info(device)
    budget = total if settings.gpu_memory_gb is None else settings.gpu_memory_gb * memory.GB
    return budget, max(0, total - free - torch.cuda.memory_reserved(device))


def batch_for(
    plan: memory.Plan,
    parts: memory.Parts,
    shapes: memory.Shapes,
    worst: memory.Job,
    budget: float,
    request: GenerateRequest,
) -> int:
    """The most of `request`'s images the plan denoises at once (the worst job's LoRAs stay loaded)."""
    job = memory.Job(
        width=request.width,
        height=request.height,
        images=request.num_images,
        guidance=request.guidance_scale > 0,
        control=request.control_image is not None,
        loras=worst.loras,
        expansion=False,
        upscale=False,  # an upscale is one image: nothing to split
    )
    return memory.largest_batch(plan, parts, shapes, job, budget)
