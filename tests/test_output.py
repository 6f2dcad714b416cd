"""Output encoding and pricing: real image bytes of the declared format; cost per returned image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from src.delivery.encoding import MIME_TYPES, data_uri, encode_image
from src.request.pricing import job_cost


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    gradient = np.linspace(0, 255, 256, dtype=np.uint8)
    array = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:, None], 128), axis=-1)
    return Image.fromarray(array.astype(np.uint8))


@pytest.mark.parametrize(("fmt", "pil_name"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_format_is_a_real_image_of_its_type(picture, fmt, pil_name):
    data = encode_image(picture, fmt, 90)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == pil_name and decoded.size == picture.size
    assert data_uri(data, fmt).startswith(f"data:{MIME_TYPES[fmt]};base64,")


def test_png_is_lossless(picture):
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(encode_image(picture, "png", 1)))), np.asarray(picture)
    )


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_quality_changes_the_bytes(picture, fmt):
    assert len(encode_image(picture, fmt, 10)) < len(encode_image(picture, fmt, 100))


def test_unknown_format_is_a_programming_error(picture):
    with pytest.raises(ValueError):
        encode_image(picture, "gif", 90)


@pytest.mark.parametrize(
    ("price", "count", "cost"),
    [(0.005, 1, 0.005), (0.005, 4, 0.02), (0.005, 0, 0.0), (0.0033333333, 3, 0.01)],
)
def test_cost_is_price_times_images_rounded(price, count, cost):
    assert job_cost(price, count) == cost


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_png_is_a_valid_png_with_the_same_pixels_as_pils(seed):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)  # odd sizes, every byte value
    array[:5] = 255  # and some flat rows, where the filter's wrap-around matters
    image = Image.fromarray(array)
    data = encode_image(image, "png", 95)
    Image.open(io.BytesIO(data)).verify()  # checks every chunk's CRC
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (53, 37)
    assert np.array_equal(np.asarray(decoded), array)


def test_non_rgb_png_goes_through_pil(picture):
    grey = picture.convert("L")
    decoded = Image.open(io.BytesIO(encode_image(grey, "png", 95)))
    assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), np.asarray(grey))


def test_a_large_png_deflated_in_pieces_is_one_valid_stream():
    """Over 512 KiB the deflating is split across threads; the result must still be one PNG."""
    array = np.random.default_rng(3).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    data = encode_image(Image.fromarray(array), "png", 95)
    Image.open(io.BytesIO(data)).verify()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), array)
