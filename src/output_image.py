"""Output encoding: PNG, JPEG or WebP bytes, and data URIs when no bucket is set."""

from __future__ import annotations

import base64
import io

from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: measured in BENCHMARKS.md on 1024x1024 images, it encodes several times
# faster than PIL's default (6) for files a few percent larger, and PNG stays lossless.
PNG_COMPRESS_LEVEL = 1
# libwebp's method trades speed for size (0 fastest, 6 smallest); 4 is its own default
# and keeps encoding well under the upload time (BENCHMARKS.md).
WEBP_METHOD = 4


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=WEBP_METHOD)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()


def data_uri(data: bytes, output_format: str) -> str:
    return f"data:{MIME_TYPES[output_format]};base64,{base64.b64encode(data).decode('ascii')}"
