"""Output encoding: PNG, JPEG or WebP bytes, and data URIs when no bucket is set."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: on a photo-like 1024x1024 image (BENCHMARKS.md) PIL takes 88 ms at level 1
# against 141 ms at its default 6, for a file 12% larger; PNG stays lossless either way.
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
    generated images, and the deflating is spread over the cores (BENCHMARKS.md has the
    figures against PIL's levels). Image encoding is most of the worker's own overhead.
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
            _png_chunk(b"IDAT", _parallel_zlib(filtered.tobytes())),
            _png_chunk(b"IEND", b""),
        )
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# zlib releases the GIL, so pieces of one image deflate on several cores at once (pigz's
# method): each piece is raw deflate ending on a byte boundary, the last one final, and
# the pieces joined under one zlib header and the whole data's Adler-32 are one stream.
_ZLIB_PIECE = 512 * 1024
_ZLIB_THREADS = min(8, os.cpu_count() or 1)
_ZLIB_POOL = ThreadPoolExecutor(max_workers=_ZLIB_THREADS, thread_name_prefix="deflate")


def _parallel_zlib(data: bytes) -> bytes:
    view = memoryview(data)
    count = max(1, min(_ZLIB_THREADS, len(data) // _ZLIB_PIECE))
    size = -(-len(data) // count)
    pieces = [(view[start : start + size], start + size >= len(data)) for start in range(0, len(data), size)]
    body = b"".join(_ZLIB_POOL.map(_deflate_piece, pieces))
    return b"\x78\x01" + body + zlib.adler32(data).to_bytes(4, "big")


def _deflate_piece(piece: tuple[memoryview, bool]) -> bytes:
    data, last = piece
    deflate = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, -15)
    return deflate.compress(data) + deflate.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
