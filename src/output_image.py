"""Output encoding: PNG, JPEG or WebP bytes, and data URIs when no bucket is set."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: on a photo-like 1024x1024 image (BENCHMARKS.md) PIL takes 92 ms at level 1
# against 147 ms at its default 6, for a file 12% larger; PNG stays lossless either way.
PNG_COMPRESS_LEVEL = 1
# libwebp's method trades speed for size (0 fastest, 6 smallest); 4 is its own default
# and keeps encoding well under the upload time (BENCHMARKS.md).
WEBP_METHOD = 4


def encode_image(image: Image.Image, output_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png" and image.mode == "RGB":
        return fast_png(image)
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


def fast_png(image: Image.Image) -> bytes:
    """An 8-bit RGB PNG with the 'Up' filter on every row, deflated at zlib level 1.

    PIL tries every filter on every row; one vectorised filter compresses as well on
    generated images and halves the encode time (BENCHMARKS.md: 1024x1024 in ~40 ms
    against PIL's ~95 ms at the same level), which is most of the worker's own overhead.
    """
    rows = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * 3)
    filtered = np.empty((image.height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type 2, "Up": each byte minus the byte above it
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), PNG_COMPRESS_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
