"""Output sizes: the `W*H` rule, the presets, and `auto` (the input picture's own size).

`auto_size` is the one place the `auto` rule lives (API.md, "Sizes: auto"); the job flow calls it
once the picture that decides it is open and EXIF-rotated, before anything is fitted.
"""

from __future__ import annotations

import re
from fractions import Fraction

MIN_SIDE, MAX_SIDE, SIDE_STEP = 256, 2048, 16
PRESET_SIZES = (
    "512*512",
    "768*768",
    "1024*1024",
    "1280*1280",
    "1024*768",
    "768*1024",
    "1280*720",
    "720*1280",
)
SIZE_RULE = (
    f"'W*H' (or 'WxH') where width and height are multiples of {SIDE_STEP} in {MIN_SIDE}..{MAX_SIDE} "
    f"(presets: {', '.join(PRESET_SIZES)})"
)
# The picture that decides `auto`, in order: `image` when the request has one, else `control_image`.
AUTO = "auto"
AUTO_SOURCES = ("image", "control_image")


def parse_size(size: str) -> tuple[int, int]:
    """'1024*768' or '1024x768' -> (1024, 768); raises ValueError with the rule."""
    match = re.fullmatch(r"\s*(\d{1,5})\s*[*xX]\s*(\d{1,5})\s*", size, flags=re.ASCII)
    width, height = (int(match[1]), int(match[2])) if match else (0, 0)
    sides_ok = all(side % SIDE_STEP == 0 and MIN_SIDE <= side <= MAX_SIDE for side in (width, height))
    # The pixel budget is implied by the side bounds today; kept so a wider range cannot raise it.
    if not sides_ok or width * height > MAX_SIDE * MAX_SIDE:
        raise ValueError(SIZE_RULE)
    return width, height


def resolved_size(size: str) -> tuple[int, int]:
    """A size already checked (by parse_size, or an upscale's factor) -> (width, height)."""
    width, _, height = size.replace("x", "*").replace("X", "*").partition("*")
    return int(width), int(height)


def auto_size(width: int, height: int) -> tuple[int, int]:
    """A picture's size -> the output size `auto` makes of it.

    Scaled, keeping the aspect ratio, down to fit within MAX_SIDE per side, or up until the shorter
    side is MIN_SIDE; then each side rounded down to a multiple of SIDE_STEP and clamped to
    MIN_SIDE..MAX_SIDE (only a picture longer than 8:1 needs the clamp, and is cropped by the fit).
    Exact fractions: 120 * (256 / 120) in floats can fall just short of 256 and round down to 240.
    """
    if width < 1 or height < 1:
        raise ValueError(f"a picture has no size {width}x{height}")
    scale = Fraction(1)
    if max(width, height) > MAX_SIDE:
        scale = Fraction(MAX_SIDE, max(width, height))
    elif min(width, height) < MIN_SIDE:
        scale = Fraction(MIN_SIDE, min(width, height))
    return tuple(  # type: ignore[return-value]
        min(max(int(side * scale) // SIDE_STEP * SIDE_STEP, MIN_SIDE), MAX_SIDE) for side in (width, height)
    )
