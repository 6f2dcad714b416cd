"""OpenAI's mask convention -> the native one, so nothing below the edge reads alpha as a mask.

OpenAI's edits regenerate where the mask is transparent and keep it where it is opaque; the
native `mask` is grayscale, white = regenerate, black = keep. A mask with an alpha channel
becomes 255 - alpha (partly transparent blends, as grey does natively); one without alpha is
read as the native mask already is. The mask is fetched once, here, with the native loader's
rules and caps, and goes inward as a lossless PNG data URI.
"""

from __future__ import annotations

import io

from PIL import ImageChops

from src.delivery.encoding import data_uri
from src.inputs.pictures import open_input


def native_mask(value: str) -> str:
    """A mask in OpenAI's convention (URL, data URI or base64) -> a native mask as a data URI."""
    mask = open_input(value, "mask")  # EXIF-rotated, as the native loader does
    if mask.has_transparency_data:
        gray = ImageChops.invert(mask.convert("RGBA").getchannel("A"))
    else:
        gray = mask.convert("L")
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    return data_uri(buffer.getvalue(), "png")
