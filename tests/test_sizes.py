"""`size: "auto"`: the rule as one pure table, the request's rules, and jobs through the real worker."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from src.inputs.pictures import cover_crop
from src.request.parse import parse_request
from src.request.sizes import auto_size, parse_size
from src.runtime.errors import JobError
from tests.conftest import data_uri_of, decode_data_uri, handle_job, png_bytes


@pytest.mark.parametrize(
    ("picture", "size"),
    [
        # API.md's examples
        ((640, 480), (640, 480)),
        ((1000, 750), (992, 736)),
        ((4000, 3000), (2048, 1536)),
        ((200, 120), (416, 256)),
        # as they are: already within the rules
        ((256, 256), (256, 256)),
        ((2048, 2048), (2048, 2048)),
        ((1024, 768), (1024, 768)),
        # tiny pictures scale up until the shorter side is 256 (exact: 120 * 256/120 is 256, not 255)
        ((1, 1), (256, 256)),
        ((64, 48), (336, 256)),
        ((120, 120), (256, 256)),
        # huge ones scale down to 2048 on the longer side
        ((6000, 4000), (2048, 1360)),
        ((2049, 1), (2048, 256)),
        ((3000, 8000), (768, 2048)),
        # extreme aspect ratios: the short side is clamped to 256 (the fit then crops the long side)
        ((10, 300), (256, 2048)),
        ((3000, 100), (2048, 256)),
        ((5000, 200), (2048, 256)),
    ],
)
def test_auto_size_table(picture, size):
    assert auto_size(*picture) == size
    parse_size(f"{size[0]}*{size[1]}")  # always a size the rules allow


def test_auto_keeps_the_aspect_ratio_within_a_step():
    for width, height in [(1000, 750), (333, 777), (1920, 1080), (4032, 3024), (300, 257)]:
        out_w, out_h = auto_size(width, height)
        assert abs(out_w / out_h - width / height) < 0.1
        assert max(out_w, out_h) <= 2048 and min(out_w, out_h) >= 256


# ------------------------------------------------------------------------ the request
PICTURE = "aGVsbG8="  # any base64: these rules are checked before anything is decoded


def test_auto_is_accepted_with_a_picture_and_names_its_source():
    assert parse_request({"prompt": "a", "size": "auto", "image": PICTURE}).auto_source == "image"
    request = parse_request({"prompt": "a", "size": "auto", "control_image": PICTURE})
    assert request.auto_source == "control_image"
    both = parse_request(
        {"prompt": "a", "size": "auto", "image": PICTURE, "mask": PICTURE, "control_image": PICTURE}
    )
    assert both.auto_source == "image"  # `image` decides when there is one
    assert both.with_size(640, 480).size == "640*480" and both.with_size(640, 480).width == 640


def test_auto_without_a_picture_names_size():
    with pytest.raises(JobError) as caught:
        parse_request({"prompt": "a", "size": "auto"})
    assert str(caught.value).startswith("size: 'auto' takes the size of 'image' or 'control_image'")


@pytest.mark.parametrize("value", ["AUTO", "Auto", " auto", "auto*auto", ""])
def test_other_spellings_are_not_auto(value):
    with pytest.raises(JobError) as caught:
        parse_request({"prompt": "a", "size": value, "image": PICTURE})
    message = str(caught.value)
    assert message.startswith("size: ") and "or 'auto'" in message, message


# -------------------------------------------------------------------- jobs on the worker
def rotated_jpeg() -> tuple[str, Image.Image]:
    """200x120 stored, EXIF orientation 6: it shows as 120x200, blue on top."""
    stored = Image.new("RGB", (200, 120), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 100, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)
    shown = stored.transpose(Image.Transpose.ROTATE_270)
    return data_uri_of(buffer.getvalue(), "image/jpeg"), shown


def test_auto_takes_the_rotated_image_size_and_reports_it(worker):
    uri, shown = rotated_jpeg()
    assert shown.size == (120, 200)
    job = {"prompt": "a", "image": uri, "size": "auto", "strength": 0.0, "enable_safety_checker": False}
    output = handle_job(worker, {"id": "auto", "input": job})
    assert (output["width"], output["height"]) == auto_size(120, 200) == (256, 416)
    out = decode_data_uri(output["image_url"])
    assert out.size == (256, 416)
    # strength 0 returns the fitted input: the picture as shown, fitted to the size auto chose
    fitted = cover_crop(Image.open(io.BytesIO(_payload(uri))), 256, 416)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(fitted))
    assert np.asarray(out)[20, 128][2] > 200  # blue on top: rotated before the size was read


def test_auto_with_generation_and_a_mask(worker):
    picture = data_uri_of(png_bytes((320, 240)))
    mask = np.zeros((240, 320), dtype=np.uint8)
    mask[:, 160:] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    job = {"prompt": "a", "image": picture, "size": "auto", "num_inference_steps": 1, "seed": 1}
    plain = handle_job(worker, {"id": "auto-i2i", "input": job})
    assert (plain["width"], plain["height"]) == (336, 256)
    assert decode_data_uri(plain["image_url"]).size == (336, 256)
    # The same picture at the explicit size is the same job: same bytes.
    explicit = handle_job(worker, {"id": "i2i", "input": {**job, "size": "336*256"}})
    assert explicit["image_url"] == plain["image_url"]
    inpaint = handle_job(
        worker, {"id": "auto-inpaint", "input": {**job, "mask": data_uri_of(buffer.getvalue())}}
    )
    assert (inpaint["width"], inpaint["height"]) == (336, 256)


def _payload(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])
