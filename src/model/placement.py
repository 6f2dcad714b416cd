"""The memory plan applied to the loaded models: measured, chosen, put in place once at start.

src/model/memory.py does the arithmetic; this module reads the loaded weights' byte counts and
the configs into it, and sets what each plan changes (src/jobs/startup.py calls `place` once):

- `sliced`: diffusers' VAE slicing, and tiling for the images of more than TILE_ABOVE pixels;
  each generator splits a batch into the most images that fit (`ZImageGenerator.largest_batch`).
- `offload`: the text encoder and the expander's own weights in CPU memory between uses
  (src/model/residence.py), the prompt encoder and the expander bringing them over.
- `fp8`: diffusers' layerwise casting on the transformers and the ControlNet: linear and conv
  layers stored in float8_e4m3fn and cast to the compute dtype one layer at a time. Norms,
  embedders and the final layer stay as loaded: published fp8 failures on Z-Image came from them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

from src.model import memory
from src.model.memory import GB, Choice, Job, Parts, Shapes
from src.request.schema import MAX_LORAS

STORAGE = torch.float8_e4m3fn
# Layers that keep the loaded dtype under fp8, by name: every norm, the image, timestep, caption
# (and SigLIP) embedders, the ControlNet's own image embedder, and the final layer.
KEPT = ("norm", "x_embedder", "t_embedder", "cap_embedder", "siglip_embedder", "all_final_layer")
CASTABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
ADAPTERS = r"\.lora_"  # peft's LoRA layers, added per job: small, and kept in the compute dtype
CASTING_HOOK = "layerwise_casting"  # diffusers.hooks.layerwise_casting._LAYERWISE_CASTING_HOOK


def tensors(modules: Iterable[torch.nn.Module | None]) -> dict[int, torch.Tensor]:
    """Every parameter and buffer of `modules`, each once (a shared Parameter is one object)."""
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        if module is not None:
            for tensor in [*module.parameters(), *module.buffers()]:
                found.setdefault(id(tensor), tensor)
    return found


def nbytes(found: dict[int, torch.Tensor], without: dict[int, torch.Tensor] | None = None) -> int:
    return sum(t.numel() * t.element_size() for key, t in found.items() if key not in (without or {}))


def is_cast(layer: torch.nn.Module) -> bool:
    registry = getattr(layer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(CASTING_HOOK) is not None


def castable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers fp8 stores in float8: linear and conv layers not named in KEPT, holding plain
    tensors (torchao's float8 matmuls, ZIMAGE_PRECISION=fp8, already stored theirs)."""
    return [
        (name, layer)
        for name, layer in model.named_modules()
        if isinstance(layer, CASTABLE)
        and not any(re.search(pattern, name) for pattern in (*KEPT, ADAPTERS))
        and type(layer.weight.data) in (torch.Tensor, torch.nn.Parameter)
    ]


def fp8_bytes(model: torch.nn.Module | None, without: dict[int, torch.Tensor]) -> tuple[int, int]:
    """`model`'s own bytes stored as fp8 would store them, and its largest cast layer's bytes."""
    if model is None:
        return 0, 0
    cast = {id(t): t for _, layer in castable(model) for t in layer.parameters(recurse=False)}
    total = largest = 0
    for key, tensor in tensors([model]).items():
        if key not in without:
            total += tensor.numel() * (1 if key in cast else tensor.element_size())
    for _, layer in castable(model):
        largest = max(largest, nbytes(tensors([layer])))
    return total, largest


def measure(
    transformers: list[torch.nn.Module],
    text_encoders: list[torch.nn.Module],
    vaes: list[torch.nn.Module],
    controlnet: torch.nn.Module | None = None,
    expander: torch.nn.Module | None = None,
    others: Iterable[torch.nn.Module | None] = (),
    tile_controlnet: torch.nn.Module | None = None,
) -> Parts:
    """Each part's weights in bytes, every shared tensor counted with the part that loaded it."""
    found_transformers = tensors(transformers)
    found_text = tensors(text_encoders)
    found_control = tensors([controlnet])
    fp8_transformers = sum(fp8_bytes(t, {})[0] for t in transformers)  # no two share a tensor
    fp8_control, largest_control = fp8_bytes(controlnet, found_transformers)
    fp8_tile, largest_tile = fp8_bytes(tile_controlnet, found_transformers)
    return Parts(
        transformers=nbytes(found_transformers),
        text_encoder=nbytes(found_text),
        vae=nbytes(tensors(vaes)),
        controlnet=nbytes(found_control, found_transformers),
        tile_controlnet=nbytes(tensors([tile_controlnet]), found_transformers),
        expander=nbytes(tensors([expander]), found_text),
        others=nbytes(tensors(others)),
        fp8_transformers=fp8_transformers,
        fp8_controlnet=fp8_control,
        fp8_tile_controlnet=fp8_tile,
        largest_cast_layer=max([largest_control, largest_tile, *(fp8_bytes(t, {})[1] for t in transformers)]),
    )


def shapes_of(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    controlnet: torch.nn.Module | None = None,
    tile_controlnet: torch.nn.Module | None = None,
) -> Shapes:
    """The config numbers memory.py scales working memory with."""
    config, vae_config, text_config = transformer.config, vae.config, text_encoder.config
    dim = config.dim
    value_bytes = next(transformer.parameters()).element_size()
    hints, tile_hints = hints_of(controlnet), hints_of(tile_controlnet)
    adapters = sum(
        min(memory.LORA_RANK, layer.in_features, layer.out_features)
        * (layer.in_features + layer.out_features)
        for layer in transformer.modules()
        if isinstance(layer, torch.nn.Linear)
    )
    widths = vae_config.block_out_channels
    return Shapes(
        dim=dim,
        ffn_dim=int(dim / 3 * 8),  # ZImageTransformerBlock's FeedForward
        patch=config.all_patch_size[0],
        vae_scale=2 ** (len(widths) - 1),
        decoder_widths=(widths[0], widths[min(1, len(widths) - 1)]),
        text_hidden=text_config.hidden_size,
        text_layers=text_config.num_hidden_layers,
        value_bytes=value_bytes,
        control_hints=hints,
        lora_bytes=adapters * value_bytes,
        tile_hints=tile_hints,
        vae_tile=vae_config.sample_size,
    )


def hints_of(controlnet: torch.nn.Module | None) -> int:
    """The hints a ControlNet adds in a step (its layer places), kept until the transformer uses them."""
    if controlnet is None:
        return 0
    places = controlnet.config.control_layers_places or []
    return len(places) + len(controlnet.config.control_refiner_layers_places or [])


def store_fp8(model: torch.nn.Module, compute: torch.dtype) -> list[str]:
    """diffusers' layerwise casting on `model`'s castable layers: stored in fp8, computed in
    `compute`. A layer another model already cast (the ControlNet borrows the transformer's
    embedders and refiners) keeps its one hook. Returns the names cast."""
    names = []
    for name, layer in castable(model):
        if is_cast(layer):
            continue
        apply_layerwise_casting_hook(layer, STORAGE, compute, non_blocking=False)
        # peft gives a LoRA the base layer's dtype, or its `compute_dtype` where it has one (the
        # convention of bitsandbytes' layers): an adapter stored in fp8 would lose its precision.
        layer.compute_dtype = compute
        names.append(name)
    # Hooks added after the model's registry was first built stale its cached child list.
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    return names


@dataclass
class Placement:
    """What start-up logs and the tests read: the plan, its budget, and where each part lives."""

    choice: Choice
    budget: float  # bytes; math.inf for no budget
    where: dict[str, str]
    parts: Parts
    shapes: Shapes

    @property
    def line(self) -> str:
        budget = "unlimited" if self.budget == math.inf else f"{self.budget / GB:.3g} GB"
        parts = ", ".join(f"{part} {where}" for part, where in self.where.items())
        line = f"memory plan: {self.choice.plan.name} for {budget}: {parts}"
        line += f", {self.choice.lora_slots} LoRA slots"
        if not self.choice.fits:
            line += f" (forced: it does not fit, the largest job needs {self.choice.need / GB:.3g} GB)"
        return line


def worst_job(max_loaded_loras: int, upscale_tile: int = Job.tile) -> Job:
    """The largest job the contract accepts, with the LoRA adapters that stay loaded (the slots the
    plan may lower to MAX_LORAS) and upscaling's tiles."""
    return Job(loras=max(MAX_LORAS, max_loaded_loras), tile=upscale_tile)
