"""Outpainting (`outpaint`) on the real inpainting pipeline with the tiny random model.

The input is random noise, so every pixel is distinct and "kept exactly" means something; the
canvas and mask the rule builds (src/inputs/canvas.py) are what the output is checked against.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import ZImageInpaintPipeline
from PIL import Image

from builder.tiny_model import build_tiny_expander
from src.inputs.canvas import outpainted
from src.jobs.worker import Worker
from src.model.modes import mode_of
from src.openai_images.routes import OpenAIImages
from src.request.parse import parse_request
from src.runtime.errors import JobError
from src.runtime.settings import Settings
from tests.conftest import data_uri_of, decode_data_uri, handle_job
from tests.test_two_models import base_model  # noqa: F401
from tests.test_two_models_modes import lora_both, lora_dir  # noqa: F401

RNG = np.random.default_rng(37)
SOURCE = RNG.integers(0, 256, (256, 192, 3), dtype=np.uint8)  # 192 wide, 256 high
MARGINS = {"left": 64, "right": 64}  # a 320x256 canvas: within bounds, multiples of 16, kept as is


def png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


IMAGE = png_uri(SOURCE)
JOB = {"prompt": "a wide mountain valley", "image": IMAGE, "num_inference_steps": 2, "seed": 5}


def margins(**sides: int) -> SimpleNamespace:
    return SimpleNamespace(**{"left": 0, "right": 0, "top": 0, "bottom": 0, "feather": 0, **sides})


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "outpaint", "input": {**JOB, "outpaint": MARGINS, **fields}})
    assert "error" not in output, output
    return output


def failure(worker: Worker, **fields) -> str:
    output = handle_job(worker, {"id": "bad-outpaint", "input": {**JOB, **fields}})
    assert set(output) == {"error"}, output
    return output["error"]


def pixels(uri: str) -> np.ndarray:
    return np.asarray(decode_data_uri(uri).convert("RGB")).astype(int)


def canvas_of(source: np.ndarray, width: int, height: int, **sides: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = outpainted(Image.fromarray(source), margins(**sides), width, height)
    return np.asarray(image).astype(int), np.asarray(mask).astype(int)


# ------------------------------------------------------------------- the canvas rule
def test_the_canvas_is_the_input_with_its_edges_stretched_and_a_white_margin_mask():
    image, mask = canvas_of(SOURCE, 320, 288, left=64, right=64, top=32)
    assert np.array_equal(image[32:, 64:256], SOURCE)
    assert np.array_equal(image[32:, :64], np.repeat(SOURCE[:, :1], 64, axis=1))  # the left edge, stretched
    assert np.array_equal(image[:32, 64:256], np.repeat(SOURCE[:1], 32, axis=0))  # the top edge
    assert (mask[32:, 64:256] == 0).all()
    assert (mask[:32] == 255).all() and (mask[:, :64] == 255).all() and (mask[:, 256:] == 255).all()


def test_feather_ramps_only_inside_the_sides_that_grew():
    _, mask = canvas_of(SOURCE, 256, 256, left=64, feather=8)
    inside = mask[:, 64:]
    assert (mask[:, :64] == 255).all()
    # White at the input's new edge, down to black 8 pixels in; the sides without a margin stay black.
    assert list(inside[100, :9]) == [255, 223, 191, 159, 128, 96, 64, 32, 0]
    assert (inside[:, 8:] == 0).all()


def test_rounding_down_cuts_the_margins_not_the_input():
    """A 229x261 canvas is 224*256 under `auto`: 5 columns and 5 rows come off the margins."""
    image, mask = canvas_of(SOURCE, 224, 256, left=27, right=10, top=5)
    # 5 of the 37 columns: 27/37 of them on the left (3), the rest (2) on the right; 5 rows off the top.
    assert np.array_equal(image[:, 24:216], SOURCE)
    assert (mask[:, 24:216] == 0).all() and (mask[:, :24] == 255).all() and (mask[:, 216:] == 255).all()


def test_a_scaled_canvas_is_built_at_the_output_s_size():
    """3000x2000 with 2048 on every side is a 43 MP canvas; scaled into 2048*1760, it is built at
    that size: numpy never holds more than a few output-sized arrays (the issue: ~110 MP held)."""
    import tracemalloc

    big = Image.fromarray(np.tile(SOURCE, (8, 16, 1))[:2000, :3000])
    output = 2048 * 1760
    tracemalloc.start()
    image, mask = outpainted(big, margins(left=2048, right=2048, top=2048, bottom=2048), 2048, 1760)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.size == mask.size == (2048, 1760)
    assert peak < 3 * output * 3, peak  # three RGB arrays of the output's size at most
    inside = np.asarray(mask)[1760 // 2 - 100 : 1760 // 2 + 100, 1024 - 100 : 1024 + 100]
    assert (inside == 0).all() and np.asarray(mask)[0, 0] == 255 == np.asarray(mask)[-1, -1]


@pytest.mark.parametrize(
    ("sides", "size"),
    [
        (MARGINS, (320, 256)),  # within bounds, multiples of 16: the canvas's own size
        ({"left": 27, "right": 10, "top": 5}, (224, 256)),  # rounded down to multiples of 16
        ({"top": 100}, (192, 356)),  # under 256 a side: scaled up with the input (to 256*464)
        ({"left": 2048, "right": 2048}, (4288, 256)),  # longer than 8:1: 2048*256, the sides cropped
    ],
)
def test_the_output_size_is_the_canvas_s_under_size_auto(sides, size):
    from src.request.sizes import auto_size

    request = parse_request({**JOB, "outpaint": sides}).with_auto_size((192, 256))
    assert (request.width, request.height) == auto_size(*size)
    assert mode_of(request).name == "outpainting" and request.strength == 1.0


# ------------------------------------------------------------------- on the worker
def test_the_input_is_kept_exactly_and_the_margins_are_generated(worker):
    output = run(worker)
    assert (output["width"], output["height"]) == (320, 256) and output["cost"] == 0.005
    out = pixels(output["image_url"])
    start, _ = canvas_of(SOURCE, 320, 256, **MARGINS)
    assert np.array_equal(out[:, 64:256], SOURCE)
    margin = np.concatenate([out[:, :64], out[:, 256:]], axis=1)
    stretched = np.concatenate([start[:, :64], start[:, 256:]], axis=1)
    assert (margin != stretched).mean() > 0.9  # made by the model, not the edge pixels


def test_with_feather_only_the_deeper_pixels_stay_exact(worker):
    out = pixels(run(worker, outpaint={**MARGINS, "feather": 16})["image_url"])
    assert np.array_equal(out[:, 64 + 16 : 256 - 16], SOURCE[:, 16:-16])
    assert (out[:, 64:72] != SOURCE[:, :8]).mean() > 0.5  # the seam blends into the generated margin


def test_a_lower_strength_starts_the_margins_from_the_stretched_edges(worker):
    full, partial = run(worker), run(worker, strength=0.5)
    assert full["image_url"] != partial["image_url"]
    assert np.array_equal(pixels(partial["image_url"])[:, 64:256], SOURCE)


def test_same_request_same_bytes(worker):
    first, second = run(worker, seed=9), run(worker, seed=9)
    assert first["image_url"] == second["image_url"]
    assert run(worker, seed=10)["image_url"] != first["image_url"]


def test_two_images_each_keep_the_input_at_one_image_s_price_each(worker):
    output = run(worker, num_images=2, output_format="webp")
    assert [entry["seed"] for entry in output["images"]] == [5, 6] and output["cost"] == 0.01
    lossless = run(worker, num_images=2)
    batch = [pixels(entry["image_url"]) for entry in lossless["images"]]
    assert all(np.array_equal(out[:, 64:256], SOURCE) for out in batch)
    assert not np.array_equal(batch[0], batch[1])
    assert decode_data_uri(output["images"][1]["image_url"]).format == "WEBP"


def test_a_canvas_past_2048_is_scaled_into_it_with_the_input(worker):
    """A 3:1 canvas (704x704 with 704 on each side: 2112x704) comes out 2048*672."""
    source = RNG.integers(0, 256, (704, 704, 3), dtype=np.uint8)
    sides = {"left": 704, "right": 704}
    output = run(worker, image=png_uri(source), outpaint=sides, num_inference_steps=1)
    assert (output["width"], output["height"]) == (2048, 672)
    image, mask = canvas_of(source, 2048, 672, **sides)
    out = pixels(output["image_url"])
    assert (mask == 0).mean() > 0.3
    assert np.array_equal(out[mask == 0], image[mask == 0])  # the scaled input, kept exactly


def test_the_pixels_equal_diffusers_given_the_canvas_and_mask(worker):
    output = run(worker, outpaint={**MARGINS, "top": 32, "feather": 8}, strength=0.9)
    image, mask = outpainted(Image.fromarray(SOURCE), margins(**MARGINS, top=32, feather=8), 320, 288)
    pipe = ZImageInpaintPipeline(**worker.generator.pipelines["outpainting"].components)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=JOB["prompt"],
        image=image,
        mask_image=mask,
        strength=0.9,
        height=288,
        width=320,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images[0]
    expected = (expected * 255).round().astype(int)
    out, m = pixels(output["image_url"]), np.asarray(mask)
    regenerate = m == 255
    assert regenerate.mean() > 0.3
    assert np.abs(out[regenerate] - expected[regenerate]).max() <= 2
    # diffusers alone keeps the input only in latent space; the worker's composite keeps its bytes.
    assert np.array_equal(out[m == 0], np.asarray(image).astype(int)[m == 0])


def test_the_openai_edits_route_takes_outpaint_through_extra_body(worker):
    body = {"prompt": JOB["prompt"], "image": IMAGE, "seed": 5, "num_inference_steps": 2}
    job = {"openai_route": "/v1/images/edits", "openai_input": {**body, "outpaint": MARGINS}}
    reply = asyncio.run(OpenAIImages(worker).handle({"id": "openai", "input": job}))
    assert reply["size"] == "320x256", reply
    native = run(worker)
    assert reply["data"][0]["url"] == native["image_url"]
    without_image = {key: value for key, value in job["openai_input"].items() if key != "image"}
    generations = {"openai_route": "/v1/images/generations", "openai_input": without_image}
    refused = asyncio.run(OpenAIImages(worker).handle({"id": "gen", "input": generations}))
    assert refused["error"]["param"] == "outpaint", refused
    bad = {**job, "openai_input": {**body, "outpaint": {"left": -3}}}
    refused = asyncio.run(OpenAIImages(worker).handle({"id": "bad", "input": bad}))
    assert refused["error"]["param"] == "outpaint.left" and "-3" in refused["error"]["message"]


# ------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"image": None}, "outpaint: needs 'image'"),
        ({"mask": IMAGE}, "outpaint: is not allowed together with 'mask'"),
        ({"control_image": IMAGE}, "outpaint: is not allowed together with 'control_image'"),
        ({"size": "1024*1024"}, "size: '1024*1024' is not allowed with 'outpaint'"),
        (
            {"outpaint": {"left": 16, "middle": 3}},
            "outpaint.middle: unknown field; allowed fields: left, right",
        ),
        (
            {"outpaint": {"left": -1}},
            "outpaint.left: -1 is not allowed: it must be an integer from 0 to 2048",
        ),
        ({"outpaint": {"right": 2049}}, "outpaint.right: 2049 is not allowed"),
        ({"outpaint": {"top": 1.5}}, "outpaint.top: 1.5 (a number) is not allowed"),
        ({"outpaint": {"top": 16.0}}, "outpaint.top: 16.0 (a number) is not allowed"),
        ({"outpaint": {"bottom": "16"}}, "outpaint.bottom: '16' is not allowed"),
        ({"outpaint": {"bottom": True}}, "outpaint.bottom: true (a boolean) is not allowed"),
        ({"outpaint": {"left": 16, "feather": 257}}, "outpaint.feather: 257 is not allowed: it must be an"),
        ({"outpaint": {"left": 16, "feather": -1}}, "outpaint.feather: -1 is not allowed"),
        ({"outpaint": {}}, "outpaint: no side has a margin"),
        ({"outpaint": {"left": 0, "feather": 8}}, "outpaint: no side has a margin"),
        ({"outpaint": "left"}, "outpaint: 'left' is not allowed: it must be an object"),
        ({"outpaint": [16, 16]}, "outpaint: a list is not allowed: it must be an object"),
    ],
)
def test_every_refusal_names_the_field(worker, fields, says):
    request = {**JOB, "outpaint": MARGINS, **fields}
    with pytest.raises(JobError) as caught:
        parse_request({key: value for key, value in request.items() if value is not None})
    assert str(caught.value).startswith(says), str(caught.value)
    message = failure(worker, **{"outpaint": MARGINS, **fields})
    assert message == str(caught.value)


def test_without_outpaint_nothing_changes():
    plain = parse_request({**JOB})
    assert plain.outpaint is None and plain.size == "1024*1024" and plain.strength == 0.8
    assert mode_of(plain).name == "image-to-image"
    assert parse_request({**JOB, "outpaint": None}) == plain


def test_outpaint_keeps_an_explicit_auto_and_strength():
    request = parse_request({**JOB, "outpaint": MARGINS, "size": "auto", "strength": 0.4})
    assert (request.size, request.strength) == ("auto", 0.4)


# ------------------------------------------------------------------- both models, LoRAs
@pytest.mark.parametrize("model", ["z-image-turbo", "z-image"])
def test_both_models_with_a_lora(lora_both, model):  # noqa: F811
    lora = [{"path": "base-style.safetensors", "scale": 1.0}]
    plain = run(lora_both, model=model)
    styled = run(lora_both, model=model, loras=lora)
    assert styled["model"] == model and styled["cost"] == plain["cost"] == {"z-image": 0.01}.get(model, 0.005)
    assert styled["timings"]["load_loras"] > 0
    ours, without = pixels(styled["image_url"]), pixels(plain["image_url"])
    assert np.array_equal(ours[:, 64:256], SOURCE) and np.array_equal(without[:, 64:256], SOURCE)
    assert np.abs(ours - without).max() > 20  # the LoRA did change the margins


# ------------------------------------------------------------------- acceleration, expansion, safety
@pytest.fixture(scope="module")
def checked_and_expanding(tiny_model: Path, never_flags: Path, tmp_path_factory) -> Worker:
    """The tiny model with a safety checker that runs (and flags nothing) and a prompt expander."""
    expander = build_tiny_expander(tiny_model, tmp_path_factory.mktemp("expander") / "tiny-qwen3")
    settings = Settings(
        model=str(tiny_model), safety_checker_model=str(never_flags), prompt_expander_model=str(expander)
    )
    return Worker.start(settings)


def test_with_acceleration_prompt_expansion_and_the_safety_checker(checked_and_expanding):
    fields = {"acceleration": "high", "enable_prompt_expansion": True, "num_inference_steps": 4}
    output = run(checked_and_expanding, **fields)
    assert output["acceleration"] == "high" and output["expanded_prompt"]
    assert output["has_nsfw_concepts"] == [False] and output["timings"]["safety"] > 0
    assert np.array_equal(pixels(output["image_url"])[:, 64:256], SOURCE)
    plain = run(checked_and_expanding, num_inference_steps=4)
    assert plain["image_url"] != output["image_url"]
