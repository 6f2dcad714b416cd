"""Modes: the pictures a request carries pick a mode; a mode is a pipeline and what it adds.

Every mode's pipeline is a view over the one set of loaded components (pipeline.py builds them
once). Adding a mode (control, inpainting with control) is a row in MODES and, when it needs one,
a picture field in PICTURE_FIELDS; the job flow does not change. request.py's validators refuse
every combination of pictures that has no row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline, ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline

from src.inpaint import composite
from src.input_image import Inputs
from src.request import GenerateRequest

PICTURE_FIELDS = ("image", "mask")

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


def _nothing(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    return {}


def _from_image(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # One copy of the input per image, so each is VAE-encoded with its own generator
    # (as a single-image request with that seed would be).
    return {"image": [inputs.image] * request.num_images, "strength": request.strength}


def _from_image_and_mask(inputs: Inputs, request: GenerateRequest) -> dict[str, Any]:
    # One mask for the batch: the pipeline repeats it for every image.
    return {**_from_image(inputs, request), "mask_image": inputs.mask}


MODES: dict[frozenset[str], Mode] = {
    frozenset(): Mode("text-to-image", ZImagePipeline, _nothing),
    frozenset({"image"}): Mode("image-to-image", ZImageImg2ImgPipeline, _from_image),
    frozenset({"image", "mask"}): Mode("inpainting", ZImageInpaintPipeline, _from_image_and_mask, composite),
}


def mode_of(request: GenerateRequest) -> Mode:
    """The row for the picture fields the request carries."""
    return MODES[frozenset(field for field in PICTURE_FIELDS if getattr(request, field) is not None)]
