"""Modes: the pictures a request carries pick a mode; a mode is a pipeline and what it adds.

Every mode's pipeline is a view over the one set of loaded components (pipeline.py builds them
once; the control rows add the ControlNet). Adding a mode is a row in MODES and, when it needs one,
a picture field in PICTURE_FIELDS; the job flow does not change. request.py's validators refuse
every combination of pictures that has no row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    ZImageControlNetInpaintPipeline,
    ZImageControlNetPipeline,
    ZImageImg2ImgPipeline,
    ZImagePipeline,
)

from src.inputs.pictures import Inputs
from src.model.inpaint import InpaintPipeline, composite
from src.model.upscale import UpscalePipeline
from src.request.schema import GenerateRequest

# The request fields that pick a mode: the pictures, `outpaint`, whose canvas and mask
# (src/inputs/canvas.py) arrive as the image and mask, and `upscale`, whose resample arrives as the image.
PICTURE_FIELDS = ("image", "mask", "control_image", "outpaint", "upscale")

Arguments = Callable[[Inputs, GenerateRequest], dict[str, Any]]
Finish = Callable[[torch.Tensor, Inputs], torch.Tensor]


@dataclass(frozen=True)
class Mode:
    name: str
    pipeline: type[DiffusionPipeline]
    # What the mode adds to the pipeline call every mode makes (prompt, size, steps, seeds, ...).
    arguments: Arguments
    # A last step on the decoded images, on the device, before the safety checker.
    finish: Finish | None = None
    # Built with the ControlNet (CONTROLNET_MODEL) beside the shared components; absent without one.
    control: bool = False
    # What else its pipeline is built with: (its argument, the generator's part), parts that may be
    # None (the Tile ControlNet, TILE_CONTROLNET_MODEL) or settings (UPSCALE_TILE).
    parts: tuple[tuple[str, str], ...] = ()
    # The `timings` stage its denoising is reported in.
    stage: str = "denoise"


def _nothing(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    return {}


def _from_image(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # One copy of the input per image, so each is VAE-encoded with its own generator
    # (as a single-image request with that seed would be).
    return {"image": [inputs.image] * request.num_images, "strength": request.strength}


def _from_image_and_mask(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # One mask for the batch: the pipeline repeats it for every image.
    return {**_from_image(inputs, request), "mask_image": inputs.mask}


def _with_control(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # One prepared control map for the batch: the pipeline repeats it for every image.
    return {"control_image": inputs.control, "controlnet_conditioning_scale": request.control_scale}


def _upscale(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # The resample (src/inputs/pictures.py); control_scale is the Tile ControlNet's (when loaded).
    return {
        "image": inputs.image,
        "strength": request.strength,
        "controlnet_conditioning_scale": request.control_scale,
    }


def _inpaint_with_control(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # No strength: this pipeline regenerates the masked area from noise (request.py refuses one).
    return {**_with_control(inputs, request), "image": inputs.image, "mask_image": inputs.mask}


MODES: dict[frozenset[str], Mode] = {
    frozenset(): Mode("text-to-image", ZImagePipeline, _nothing),
    frozenset({"image"}): Mode("image-to-image", ZImageImg2ImgPipeline, _from_image),
    # diffusers' ZImageInpaintPipeline without its unused masked-image encode (src/model/inpaint.py).
    frozenset({"image", "mask"}): Mode("inpainting", InpaintPipeline, _from_image_and_mask, composite),
    # The canvas and its mask (src/inputs/canvas.py) inpainted: the same pipeline and composite.
    frozenset({"image", "outpaint"}): Mode("outpainting", InpaintPipeline, _from_image_and_mask, composite),
    # The resample refined in blended tiles (src/model/upscale.py), with the Tile ControlNet when loaded.
    frozenset({"image", "upscale"}): Mode(
        "upscaling",
        UpscalePipeline,
        _upscale,
        parts=(("controlnet", "tile_controlnet"), ("tile", "upscale_tile")),
        stage="refine",
    ),
    frozenset({"control_image"}): Mode(
        "text-to-image with control", ZImageControlNetPipeline, _with_control, control=True
    ),
    # The kept area is put back exactly, as in plain inpainting. This pipeline's masked-image encode
    # is used (16 of the 2.x ControlNet's 33 input channels), so it is diffusers' own class.
    frozenset({"image", "mask", "control_image"}): Mode(
        "inpainting with control",
        ZImageControlNetInpaintPipeline,
        _inpaint_with_control,
        composite,
        control=True,
    ),
}


def mode_of(request: GenerateRequest) -> Mode:
    """The row for the picture fields the request carries."""
    return MODES[frozenset(field for field in PICTURE_FIELDS if getattr(request, field) is not None)]
