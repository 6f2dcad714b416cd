"""Outpainting's canvas: the input with margins around it, and the mask that regenerates them.

API.md, "Outpainting": the canvas is the EXIF-rotated input with the margins added; the output
size is the canvas's under size `auto` (src/request/sizes.py, applied before this runs), and the
inpainting mode does the rest (src/model/modes.py). The mask is white over the margins and black
over the input, so the composite (src/model/inpaint.py) keeps every input pixel exactly; `feather`
ramps it from white at the input's new edges to black `feather` pixels inside them.

The margins start as the input's edge pixels stretched outward: with strength 1.0 the model
never sees them (it starts from noise where the mask is white), below 1 they are the start the
model refines, which a flat colour would not be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

# A canvas at most this much larger than the output on each side (the output sides are multiples
# of src/request/sizes.py's SIDE_STEP, 16) was only rounded down by `auto`: it is cut to size, not
# resampled, so the input's pixels are the ones that arrived.
ROUNDING = 16


class Margins(Protocol):
    """What the canvas reads of a request's `outpaint` (src/request/schema.py's Outpaint), named
    here so that this package does not import the request's, which stands above it."""

    left: int
    right: int
    top: int
    bottom: int
    feather: int


def outpainted(
    picture: Image.Image, margins: Margins, width: int, height: int
) -> tuple[Image.Image, Image.Image]:
    """An RGB picture -> (the canvas, its mask), at the output's `width` x `height`.

    The canvas is built at the size it is used: when `auto` scaled it, the picture is scaled
    first and the margins are added at the output's scale, so a 40 MP input with 2048 on every
    side never becomes a 110 MP canvas in memory.
    """
    across = picture.width + margins.left + margins.right
    down = picture.height + margins.top + margins.bottom
    share = (_share(margins.left, margins.right), _share(margins.top, margins.bottom))
    if all(0 <= extra < ROUNDING for extra in (across - width, down - height)):
        return _cut(*_padded(picture, margins, margins.feather), share, width, height)
    # Scaled as ImageOps.fit would scale the whole canvas (to cover the size), then cut to it.
    scale = max(width / across, height / down)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    scaled = picture.resize(size, Image.Resampling.LANCZOS)
    pads = _Pads(
        *_split(width - size[0], share[0], margins.left, margins.right),
        *_split(height - size[1], share[1], margins.top, margins.bottom),
        feather=max(1, round(margins.feather * scale)) if margins.feather else 0,
    )
    return _cut(*_padded(scaled, pads, pads.feather), share, width, height)


@dataclass(frozen=True)
class _Pads:
    """Margins at the output's scale (a Margins)."""

    left: int
    right: int
    top: int
    bottom: int
    feather: int


def _split(extra: int, share: float, before: int, after: int) -> tuple[int, int]:
    """The pixels of margin one axis needs at the output's scale, parted as the margins were."""
    if extra <= 0 or not (before or after):
        return 0, 0
    first = round(extra * share)
    return first, extra - first


def _padded(picture: Image.Image, margins: Margins, feather: int) -> tuple[Image.Image, Image.Image]:
    """The picture with its margins (edge pixels stretched) and the mask (white margins, feather)."""
    pads = ((margins.top, margins.bottom), (margins.left, margins.right))
    canvas = Image.fromarray(np.pad(np.asarray(picture), (*pads, (0, 0)), mode="edge"))
    mask = Image.fromarray(np.pad(_feathered(picture.size, margins), pads, constant_values=255))
    return canvas, mask


def _feathered(size: tuple[int, int], margins: Margins) -> np.ndarray:
    """The mask over the input alone: 0 (keep), ramping to 255 at the sides that get a margin."""
    width, height = size
    across = _ramp(width, margins.feather, margins.left > 0, margins.right > 0)
    down = _ramp(height, margins.feather, margins.top > 0, margins.bottom > 0)
    return np.round(np.maximum(across[None, :], down[:, None]) * 255).astype(np.uint8)


def _ramp(length: int, feather: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Per pixel along one side: 1 at a fed edge down to 0 `feather` pixels inside it, 0 deeper."""
    ramp = np.zeros(length, dtype=np.float64)
    if feather == 0:
        return ramp
    depth = np.arange(length, dtype=np.float64)
    fade = np.clip((feather - depth) / feather, 0.0, 1.0)  # by the distance from the edge
    if at_start:
        ramp = np.maximum(ramp, fade)
    if at_end:
        ramp = np.maximum(ramp, fade[::-1])
    return ramp


def _cut(
    canvas: Image.Image, mask: Image.Image, share: tuple[float, float], width: int, height: int
) -> tuple[Image.Image, Image.Image]:
    """The canvas and mask cut to the output size, without resampling; what is cut comes off the
    margins in proportion (a canvas larger than the size only by `auto`'s rounding, or scaled)."""
    excess = (canvas.width - width, canvas.height - height)
    left, top = (int(extra * part) for extra, part in zip(excess, share, strict=True))
    box = (left, top, left + width, top + height)
    return canvas.crop(box), mask.crop(box)


def _share(before: int, after: int) -> float:
    """The part of a cut taken before the input: the margins' proportion, half when there are none."""
    return before / (before + after) if before + after else 0.5
