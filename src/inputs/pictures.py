"""Input pictures (`image`, `mask`, `control_image`): decode a data URI, bare base64 or a public URL.

One loader serves every picture field of a request; `field` names it in every error.

URLs go through the Runpod SDK's SSRF-safe `safe_get` (public addresses only, pinned
connections, every redirect re-checked; `RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1` lifts the
address check). On top of it this module holds the caps of API.md: 32 MiB, 40
megapixels and 30 s for the whole download.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image, ImageOps

from src.inputs.canvas import Margins, outpainted
from src.inputs.downloads import Limits, stream, without_query
from src.runtime.errors import JobError

MAX_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 40_000_000
DOWNLOAD_SECONDS = 30.0
# Formats a camera, phone or browser produces; other PIL decoders are not exposed to input.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers phones' MPO files
DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)

# PIL's own bomb guard raises past twice this; the explicit check below gives a clear message.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class Inputs:
    """A job's input pictures, fitted to its size; None where the request has none."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    # The control map, fitted and preprocessed (src/control/preprocess.py); loaded beside the others.
    control: Image.Image | None = None
    # Milliseconds of named stages inside the loading (an upscale's `resample`), for `timings`.
    laps: dict[str, float] = field(default_factory=dict)


class PictureFields(Protocol):
    """What `load_inputs` reads of a request (src/request/schema.py's GenerateRequest), named here
    so that this package does not import the request's, which stands above it."""

    image: str | None
    mask: str | None
    outpaint: Margins | None
    upscale: object | None  # the factor is already in the size; only its presence matters here

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


def load_inputs(request: PictureFields, opened: Image.Image | None = None) -> Inputs:
    """Every picture the request carries, fetched or decoded and fitted to its size.

    `opened`: the `image`, already open (`size: "auto"` opened it first to read its size).
    """
    if request.image is None:
        return Inputs()
    source = opened if opened is not None else open_input(request.image, "image")
    if request.outpaint is not None:  # the canvas and its mask, as `image` and `mask` (API.md)
        return Inputs(*outpainted(flat_rgb(source), request.outpaint, request.width, request.height))
    if request.upscale is not None:  # the whole picture at the output size: stretched, never cropped
        started = time.perf_counter()
        resampled = flat_rgb(source).resize((request.width, request.height), Image.Resampling.LANCZOS)
        return Inputs(resampled, laps={"resample": (time.perf_counter() - started) * 1000})
    image = cover_crop(source, request.width, request.height)
    mask = load_mask(request.mask, source.size, request.width, request.height) if request.mask else None
    return Inputs(image, mask)


def load_image(value: str, width: int, height: int, field: str = "image") -> Image.Image:
    """A picture field, EXIF-rotated, RGB, covering (width, height) and centre-cropped."""
    return cover_crop(open_input(value, field), width, height)


def load_mask(value: str, image_size: tuple[int, int], width: int, height: int) -> Image.Image:
    """The `mask`, EXIF-rotated and grayscale, fitted exactly as an image of `image_size` is.

    It must have the input image's own size: a mask of another size cannot be aligned with
    it without guessing, so it is refused rather than stretched.
    """
    mask = open_input(value, "mask").convert("L")
    if mask.size != image_size:
        raise JobError(
            f"mask: {mask.width}x{mask.height} does not match the image's {image_size[0]}x{image_size[1]}: "
            "send a mask of the input image's width and height (after EXIF rotation)"
        )
    return _fit(mask, width, height)


def open_input(value: str, field: str) -> Image.Image:
    """A picture field fetched or decoded, checked against the caps and EXIF-rotated."""
    is_url = value.lower().startswith(("http://", "https://"))
    data = fetch_url(value, field) if is_url else decode_base64(value, field)
    return ImageOps.exif_transpose(open_image(data, field))


def decode_base64(value: str, field: str = "image") -> bytes:
    match = DATA_URI.match(value)
    if match is None and value.lower().startswith("data:"):
        raise JobError(f"{field}: a data URI must look like 'data:image/png;base64,...'")
    if match is None and "://" in value[:16]:
        scheme = value.split("://", 1)[0][:16]
        raise JobError(
            f"{field}: the URL scheme {scheme!r} is not allowed: use http or https, a data URI or base64"
        )
    payload = value[match.end() :] if match else value
    if len(payload) > MAX_BYTES * 4 // 3 + 8:
        raise JobError(f"{field}: the base64 data is over the {MAX_BYTES // 2**20} MiB cap")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise JobError(
            f"{field}: not valid base64 (send an http(s) URL, a data:image/...;base64, URI or plain base64)"
        ) from None


def fetch_url(url: str, field: str = "image") -> bytes:
    """Download within the size and time caps; every failure says which cap or step."""
    limits = Limits(MAX_BYTES, DOWNLOAD_SECONDS, f"the {MAX_BYTES // 2**20} MiB cap")
    return b"".join(stream(url, field, without_query(url), limits))


def open_image(data: bytes, field: str = "image") -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS PIL only warns (it raises at twice that); the check below says more.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise JobError(
                    f"{field}: {image.width}x{image.height} is over the "
                    f"{MAX_PIXELS // 1_000_000} megapixel cap"
                )
            image.load()
    except JobError:
        raise
    except Image.DecompressionBombError:
        raise JobError(f"{field}: over the {MAX_PIXELS // 1_000_000} megapixel cap") from None
    except Image.UnidentifiedImageError:
        raise JobError(f"{field}: not an image in a supported format ({', '.join(FORMATS)})") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise JobError(f"{field}: the image file is broken or truncated ({type(err).__name__})") from None
    return image


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Apply EXIF orientation, flatten alpha onto white, cover the size and crop the centre."""
    return _fit(flat_rgb(image), width, height)


def flat_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, alpha flattened onto white, RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        image = flat
    return image.convert("RGB")


def _fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cover and centre-crop: one call for image and mask, so the two stay aligned pixel for pixel."""
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
