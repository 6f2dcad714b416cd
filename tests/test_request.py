"""The request model: every field of API.md, both sides of every bound, every type confusion."""

from __future__ import annotations

import pytest

from src.request.parse import parse_request
from src.request.schema import PRESET_SIZES, GenerateRequest
from src.runtime.errors import JobError


def ok(**fields) -> GenerateRequest:
    return parse_request({"prompt": "a cat", **fields})


def error(raw) -> str:
    with pytest.raises(JobError) as caught:
        parse_request(raw)
    return str(caught.value)


def test_defaults_match_the_contract():
    request = ok()
    assert request.image is None and request.mask is None
    assert (request.size, request.width, request.height) == ("1024*1024", 1024, 1024)
    assert request.strength == 0.8
    assert request.seed == -1
    assert request.output_format == "png"
    assert request.enable_safety_checker is True
    assert request.num_images == 1
    assert request.num_inference_steps == 8
    assert request.guidance_scale == 0.0
    assert request.negative_prompt is None
    assert request.output_quality == 95


def test_prompt_rules():
    assert ok(prompt="一只猫坐在沙发上").prompt == "一只猫坐在沙发上"
    assert ok(prompt="x" * 4000).prompt == "x" * 4000
    assert "prompt: required" in error({})
    for blank in ("", "   ", "\n\t"):
        assert error({"prompt": blank}).startswith("prompt: a blank string")
    message = error({"prompt": "x" * 4001})
    assert "prompt: a string of 4001 characters is not allowed" in message
    assert "x" * 100 not in message  # a huge input is described, not echoed
    for wrong in (5, 1.5, True, None, ["a"], {"a": 1}):
        assert error({"prompt": wrong}).startswith("prompt: ")


@pytest.mark.parametrize("size", PRESET_SIZES)
def test_every_preset_size(size):
    width, height = (int(side) for side in size.split("*"))
    request = ok(size=size)
    assert (request.width, request.height) == (width, height)
    assert ok(size=size.replace("*", "x")).width == width


@pytest.mark.parametrize("size", ["256*256", "2048*2048", "256*2048", "1008x1520", " 512 * 768 ", "512X768"])
def test_free_sizes_within_the_rules(size):
    assert ok(size=size).width % 16 == 0


@pytest.mark.parametrize(
    "size",
    [
        "５１２*５１２",
        "1000*1000",
        "240*240",
        "2064*2048",
        "0*0",
        "1024",
        "1024*",
        "big",
        "1024*768*2",
        "-512*512",
        "1024.0*1024",
    ],
)
def test_sizes_outside_the_rules(size):
    message = error({"prompt": "a", "size": size})
    assert message.startswith(f"size: {size!r} is not allowed")
    assert "multiples of 16 in 256..2048" in message and "presets: 512*512" in message


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("strength", [0.0, 0, 0.5, 1.0, 1], [-0.01, 1.01, 2]),
        ("seed", [-1, 0, 4294967295], [-2, 4294967296]),
        ("num_images", [1, 4], [0, 5]),
        ("num_inference_steps", [1, 50], [0, 51]),
        ("guidance_scale", [0.0, 0, 20.0, 7.5], [-0.1, 20.01]),
        ("output_quality", [1, 100], [0, 101]),
    ],
)
def test_numeric_bounds_on_both_sides(field, good, bad):
    extra = {"image": "aGVsbG8="} if field == "strength" else {}
    for value in good:
        assert getattr(ok(**extra, **{field: value}), field) == value
    for value in bad:
        message = error({"prompt": "a", **extra, field: value})
        assert message.startswith(f"{field}: {value!r}") and "is not allowed: it must be" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", "42"),
        ("seed", 1.5),
        ("seed", 42.0),
        ("seed", True),
        ("seed", None),
        ("num_images", "2"),
        ("num_images", 2.0),
        ("num_images", True),
        ("num_inference_steps", "8"),
        ("num_inference_steps", False),
        ("output_quality", 95.5),
        ("output_quality", "95"),
        ("guidance_scale", "1.5"),
        ("guidance_scale", True),
        ("guidance_scale", float("nan")),
        ("guidance_scale", float("inf")),
        ("strength", "0.5"),
        ("strength", False),
        ("strength", float("nan")),
        ("enable_safety_checker", "true"),
        ("enable_safety_checker", "false"),
        ("enable_safety_checker", 1),
        ("enable_safety_checker", 0),
        ("enable_safety_checker", None),
        ("size", 1024),
        ("size", [1024, 1024]),
        ("size", {"width": 1024}),
        ("output_format", 1),
        ("output_format", None),
        ("image", 123),
        ("image", ""),
        ("image", ["http://x"]),
        ("mask", 123),
        ("mask", ""),
        ("mask", ["http://x"]),
        ("negative_prompt", 5),
        ("negative_prompt", "n" * 4001),
    ],
)
def test_type_confusions_are_errors(field, value):
    extra = {"image": "aGVsbG8="} if field in ("strength", "mask") else {}
    message = error({"prompt": "a", **extra, field: value})
    assert message.startswith(f"{field}: ") and "is not allowed" in message


@pytest.mark.parametrize(
    ("given", "stored"),
    [("PNG", "png"), ("jpeg", "jpeg"), ("JPG", "jpeg"), ("jpg", "jpeg"), ("WebP", "webp")],
)
def test_output_format_is_case_insensitive_with_jpg_alias(given, stored):
    assert ok(output_format=given).output_format == stored


@pytest.mark.parametrize("fmt", ["gif", "bmp", "tiff", "", "png "])
def test_other_formats_are_errors(fmt):
    if fmt == "png ":  # surrounding spaces are forgiven, like case
        assert ok(output_format=fmt).output_format == "png"
        return
    assert error({"prompt": "a", "output_format": fmt}).startswith("output_format: ")


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("sise", "size"),
        ("seeds", "seed"),
        ("num_image", "num_images"),
        ("guidance", "guidance_scale"),
        ("negative", "negative_prompt"),
    ],
)
def test_unknown_keys_name_themselves_and_the_nearest_field(key, suggestion):
    message = error({"prompt": "a", key: 1})
    assert message.startswith(f"{key}: unknown field; did you mean '{suggestion}'?")


def test_unknown_key_with_nothing_close_lists_the_fields():
    message = error({"prompt": "a", "zzzz": 1})
    assert message.startswith("zzzz: unknown field; allowed fields: prompt, image, mask, size")


def test_strength_needs_an_image():
    assert error({"prompt": "a", "strength": 0.5}).startswith("strength: only applies to image-to-image")
    assert ok(image="aGVsbG8=", strength=0.5).strength == 0.5


def test_mask_needs_an_image():
    message = error({"prompt": "a", "mask": "aGVsbG8="})
    assert message.startswith("mask: needs 'image'") and "leave 'mask' out" in message
    assert error({"prompt": "a", "mask": None, "strength": 0.5}).startswith("strength:")
    request = ok(image="aGVsbG8=", mask="aGVsbG8=", strength=1.0)
    assert (request.mask, request.strength) == ("aGVsbG8=", 1.0)
    assert ok(mask=None).mask is None  # null means absent, as for image


def test_every_problem_is_reported_at_once():
    message = error({"prompt": "", "num_images": 9, "colour": "red"})
    assert "prompt:" in message and "num_images: 9" in message and "colour: unknown field" in message


@pytest.mark.parametrize("raw", [None, [], "prompt", 5, True])
def test_input_must_be_an_object(raw):
    assert error(raw).startswith("input: ")


def test_the_model_is_frozen():
    request = ok()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError type
        request.seed = 5
