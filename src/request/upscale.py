"""`upscale` (API.md, "Upscaling"): the factor, the output size it makes of the input, and what it
changes of the request's defaults. src/inputs/pictures.py resamples the input to that size, and the
"upscaling" mode (src/model/modes.py) refines it in tiles.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from src.request.sizes import AUTO, SIDE_STEP
from src.runtime.errors import JobError

# The recommended scale of alibaba-pai's Tile ControlNet: `control_context_scale = 0.85` in
# VideoX-Fun's examples/z_image_fun/predict_turbo_i2i_tile_2.1.py (docs/upscaling.md).
TILE_CONTROL_SCALE = 0.85
# What `upscale` changes of the defaults (with `image`): the output size comes from the factor, a
# light refine keeps the picture (0.35 of Turbo's 8 steps runs 2), and the Tile ControlNet's scale.
UPSCALE_DEFAULTS = {"size": AUTO, "strength": 0.35, "control_scale": TILE_CONTROL_SCALE}
MIN_FACTOR, MAX_FACTOR, DEFAULT_FACTOR = 1.0, 4.0, 2.0
# The output: at most this per side, and as many pixels as a square of it (16.8 MP).
MAX_OUTPUT_SIDE = 4096
MAX_OUTPUT_PIXELS = MAX_OUTPUT_SIDE * MAX_OUTPUT_SIDE


def nearest_side(side: float) -> int:
    """A side rounded to the nearest multiple of SIDE_STEP (halves up), at least one step."""
    return max(SIDE_STEP, math.floor(side / SIDE_STEP + 0.5) * SIDE_STEP)


class Upscale(BaseModel):
    """How much larger the output is than the (EXIF-rotated) input."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    factor: float = Field(
        default=DEFAULT_FACTOR,
        gt=MIN_FACTOR,
        le=MAX_FACTOR,
        allow_inf_nan=False,
        description=f"a number greater than {MIN_FACTOR} and at most {MAX_FACTOR}",
    )

    def output(self, width: int, height: int) -> tuple[int, int]:
        """The output size of a `width` x `height` input; JobError naming `upscale.factor` past the caps."""
        size = nearest_side(width * self.factor), nearest_side(height * self.factor)
        if max(size) > MAX_OUTPUT_SIDE or size[0] * size[1] > MAX_OUTPUT_PIXELS:
            largest = largest_factor(width, height)
            allowed = (
                f"the largest factor for it is {largest}"
                if largest > MIN_FACTOR
                else "it is too large to upscale; send it as it is"
            )
            raise JobError(
                f"upscale.factor: {self.factor!r} is not allowed for this {width}x{height} image: the output "
                f"would be {size[0]}x{size[1]}, over {MAX_OUTPUT_SIDE} pixels a side "
                f"({MAX_OUTPUT_SIDE}x{MAX_OUTPUT_SIDE} in all); {allowed}"
            )
        return size


def largest_factor(width: int, height: int) -> float:
    """The largest factor, in hundredths, whose output of a `width` x `height` input is within the caps."""
    # A side rounds to at most MAX_OUTPUT_SIDE below MAX_OUTPUT_SIDE + SIDE_STEP / 2; the pixel cap
    # then holds too (both sides are within MAX_OUTPUT_SIDE).
    hundredths = min(math.floor((MAX_OUTPUT_SIDE + SIDE_STEP / 2) * 100 / max(width, height)), 400)
    while (
        hundredths > 100
        and max(nearest_side(s * hundredths / 100) for s in (width, height)) > MAX_OUTPUT_SIDE
    ):
        hundredths -= 1
    return hundredths / 100


class Upscaled(Protocol):
    """What the rules below read of a request (src/request/schema.py's GenerateRequest)."""

    image: str | None
    mask: str | None
    outpaint: object | None
    control_image: str | None
    num_images: int
    size: str


def check_upscale(request: Upscaled) -> None:
    """The rules `upscale` adds to a request; each ValueError names its field."""
    if request.image is None:
        raise ValueError(
            "upscale: needs 'image', the picture to enlarge: send 'image' with it, or leave 'upscale' out"
        )
    for other in ("mask", "outpaint", "control_image"):
        if getattr(request, other) is not None:
            raise ValueError(
                f"upscale: is not allowed together with '{other}': upscaling refines the whole picture "
                f"(with the Tile ControlNet when the worker has one); leave '{other}' out"
            )
    if request.num_images > 1:
        raise ValueError(
            f"num_images: {request.num_images} is not allowed with 'upscale': an upscale returns one image; "
            "leave 'num_images' out or send 1"
        )
    if request.size != AUTO:
        raise ValueError(
            f"size: {request.size!r} is not allowed with 'upscale': the output size is the input's times "
            f"upscale.factor; leave 'size' out or send '{AUTO}'"
        )


def blank_upscale_prompt(raw: Any) -> str | None:
    """An upscaling request's absent ("") or blank prompt, which it may leave to UPSCALE_PROMPT; None
    for any other request (its prompt is checked as always)."""
    if not isinstance(raw, dict) or raw.get("upscale") is None or raw.get("image") is None:
        return None
    prompt = raw.get("prompt")
    if prompt is None:
        return ""
    return prompt if isinstance(prompt, str) and not prompt.strip() else None
