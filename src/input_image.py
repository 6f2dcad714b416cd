"""Input images for image-to-image: decode a data URI, bare base64 or a public URL.

URLs go through the Runpod SDK's SSRF-safe `safe_get` (public addresses only, pinned
connections, every redirect re-checked; `RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1` lifts the
address check). On top of it this module holds the caps of API.md: 32 MiB, 40
megapixels and 30 s for the whole download.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import socket
import threading
import time
import warnings
from urllib.parse import urlsplit

from PIL import Image, ImageOps
from requests import RequestException, Response
from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get

from src.errors import JobError

MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 40_000_000
DOWNLOAD_SECONDS = 30.0
# Formats a camera, phone or browser produces; other PIL decoders are not exposed to input.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers phones' MPO files
USER_AGENT = "zimage-turbo-worker (+https://github.com/runpod-workers)"
DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)

# PIL's own bomb guard raises past twice this; the explicit check below gives a clear message.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def load_image(value: str, width: int, height: int) -> Image.Image:
    """The request's `image`, EXIF-rotated, RGB, covering (width, height) and centre-cropped."""
    data = fetch_url(value) if value.lower().startswith(("http://", "https://")) else decode_base64(value)
    return cover_crop(open_image(data), width, height)


def decode_base64(value: str) -> bytes:
    match = DATA_URI.match(value)
    if match is None and value.lower().startswith("data:"):
        raise JobError("image: a data URI must look like 'data:image/png;base64,...'")
    if match is None and "://" in value[:16]:
        scheme = value.split("://", 1)[0][:16]
        raise JobError(
            f"image: the URL scheme {scheme!r} is not allowed: use http or https, a data URI or base64"
        )
    payload = value[match.end() :] if match else value
    if len(payload) > MAX_BYTES * 4 // 3 + 8:
        raise JobError(f"image: the base64 data is over the {MAX_BYTES // 2**20} MiB cap")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise JobError(
            "image: not valid base64 (send an http(s) URL, a data:image/...;base64, URI or plain base64)"
        ) from None


def fetch_url(url: str) -> bytes:
    """Download within the size and time caps; every failure says which cap or step."""
    shown = _without_query(url)
    deadline = time.monotonic() + DOWNLOAD_SECONDS
    too_slow = f"image: fetching {shown} took over {DOWNLOAD_SECONDS:g} s"
    try:
        with safe_get(
            url, timeout=(5, 10), max_bytes=MAX_BYTES, headers={"User-Agent": USER_AGENT}
        ) as response:
            if response.status_code >= 400:
                raise JobError(f"image: fetching {shown} failed with HTTP {response.status_code}")
            # A chunk comes back only once 64 KiB have arrived, and a host that sends a byte every
            # few seconds never trips the read timeout: at the deadline the socket is shut instead.
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, args=(response,))
            watchdog.daemon = True
            watchdog.start()
            try:
                data = b"".join(iter_content_capped(response, 1 << 16, MAX_BYTES))
            finally:
                watchdog.cancel()
            if time.monotonic() > deadline:
                raise JobError(too_slow)
            return data
    except SSRFError as err:
        reason = _without_query(str(err))
        if "size cap" in reason:
            raise JobError(f"image: {shown} is over the {MAX_BYTES // 2**20} MiB cap") from None
        raise JobError(f"image: {shown} is refused: {reason}") from None
    except RequestException as err:
        if time.monotonic() > deadline:
            raise JobError(too_slow) from None
        kind = "timed out" if "timeout" in type(err).__name__.lower() else "could not be fetched"
        raise JobError(f"image: {shown} {kind} ({type(err).__name__})") from None


def _shut(response: Response) -> None:
    """End a download from the watchdog thread: shutdown wakes a blocked read, close would not."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def open_image(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS PIL only warns (it raises at twice that); the check below says more.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise JobError(
                    f"image: {image.width}x{image.height} is over the {MAX_PIXELS // 1_000_000} megapixel cap"
                )
            image.load()
    except JobError:
        raise
    except Image.DecompressionBombError:
        raise JobError(f"image: over the {MAX_PIXELS // 1_000_000} megapixel cap") from None
    except Image.UnidentifiedImageError:
        raise JobError(f"image: not an image in a supported format ({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise JobError(f"image: the image file is broken or truncated ({type(err).__name__})") from None
    return image


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Apply EXIF orientation, flatten alpha onto white, cover the size and crop the centre."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.Resampling.LANCZOS)


def _without_query(text: str) -> str:
    """URLs as they may appear in a message: a presigned input URL's signature stays out."""

    def strip(match: re.Match[str]) -> str:
        parts = urlsplit(match[0])
        path = parts.path if len(parts.path) <= 80 else parts.path[:77] + "..."
        return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{path}"

    return re.sub(r"https?://[^\s'\"]+", strip, text)
