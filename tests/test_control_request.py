"""The control fields of the request: defaults, bounds, and every rule across fields."""

from __future__ import annotations

import pytest

from src.request.parse import parse_request
from src.runtime.errors import JobError

PICTURE = "aGVsbG8="  # any base64: these rules are checked before anything is decoded


def ok(**fields):
    return parse_request({"prompt": "a cat", **fields})


def error(**fields) -> str:
    with pytest.raises(JobError) as caught:
        parse_request({"prompt": "a cat", **fields})
    return str(caught.value)


def test_defaults_match_the_contract():
    request = ok()
    assert (request.control_image, request.control_preprocess, request.control_scale) == (None, "none", 0.75)
    request = ok(control_image=PICTURE, control_preprocess="depth", control_scale=2.0)
    assert (request.control_preprocess, request.control_scale) == ("depth", 2.0)


@pytest.mark.parametrize("preprocess", ["none", "canny", "depth"])
def test_every_preprocessor_is_accepted(preprocess):
    assert ok(control_image=PICTURE, control_preprocess=preprocess).control_preprocess == preprocess


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"control_preprocess": "hed"}, "control_preprocess: 'hed' is not allowed: it must be one of none"),
        ({"control_preprocess": "Canny"}, "control_preprocess: 'Canny' is not allowed"),
        ({"control_scale": 2.01}, "control_scale: 2.01 (a number) is not allowed: it must be a number"),
        ({"control_scale": -0.1}, "control_scale: -0.1 (a number) is not allowed"),
        ({"control_scale": "1"}, "control_scale: '1' is not allowed"),
        ({"control_scale": True}, "control_scale: true (a boolean) is not allowed"),
        ({"control_image": ""}, "control_image: a blank string '' is not allowed"),
        ({"control_image": 5}, "control_image: 5 is not allowed: it must be an http(s) URL"),
    ],
)
def test_bad_values_name_the_field(fields, says):
    assert error(**{"control_image": PICTURE, **fields}).startswith(says)


def test_bounds_are_inclusive():
    assert ok(control_image=PICTURE, control_scale=0.0).control_scale == 0.0
    assert ok(control_image=PICTURE, control_scale=2).control_scale == 2.0


@pytest.mark.parametrize("field", ["control_preprocess", "control_scale"])
def test_control_settings_need_a_control_image(field):
    value = {"control_preprocess": "canny", "control_scale": 1.0}[field]
    message = error(**{field: value})
    assert message.startswith(f"{field}: only applies with 'control_image'"), message
    assert f"leave '{field}' out" in message


def test_an_image_without_a_mask_has_no_control_mode():
    message = error(image=PICTURE, control_image=PICTURE)
    assert message.startswith("control_image: is not allowed with 'image' alone"), message
    assert "send 'mask' too" in message


def test_inpainting_with_control_takes_no_strength():
    request = ok(image=PICTURE, mask=PICTURE, control_image=PICTURE)
    assert (request.image, request.mask, request.control_image) == (PICTURE, PICTURE, PICTURE)
    message = error(image=PICTURE, mask=PICTURE, control_image=PICTURE, strength=0.5)
    assert message.startswith("strength: does not apply to inpainting with control"), message


def test_a_mask_without_an_image_still_names_mask():
    assert error(mask=PICTURE, control_image=PICTURE).startswith("mask: needs 'image'")
