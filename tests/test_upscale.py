"""Upscaling (API.md, "Upscaling: `upscale`") on the tiny models.

The refusals and the output-size rule need no model; the blend weights are pure functions
(src/model/tiles.py). The rest runs the real worker: the session's (one tile of 1024) and one
module-scoped worker with a tiny Tile ControlNet and tiles of 256 pixels, so a 384x320 output
is four tiles. On tiny random weights the checks are exactness, equivalence and determinism.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from diffusers import ZImageImg2ImgPipeline
from PIL import Image

from src.delivery.storage import Storage
from src.inputs.pictures import load_inputs
from src.jobs.worker import Worker
from src.model import tiles
from src.model.acceleration import LEVELS, steps_computed
from src.model.modes import mode_of
from src.model.pipeline import ZImageGenerator, to_pil
from src.openai_images.routes import OpenAIImages
from src.request.parse import parse_request
from src.request.upscale import TILE_CONTROL_SCALE, largest_factor
from src.runtime.errors import JobError
from src.runtime.settings import Settings, SettingsError
from src.runtime.timing import Stopwatch
from tests.conftest import data_uri_of, decode_data_uri, handle_job, run_input
from tests.loopback_servers import BUCKET, KEY_ID, SECRET
from tests.test_concurrency import _stop_after_first_step, noted_stops
from tests.test_storage import s3  # noqa: F401 - the module's S3 server on loopback
from tests.tiny_controlnets import save_tile_controlnet
from tests.tiny_loras import make_lora, save_lora

PROMPT = "a harbour at dawn, fine detail"


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour with some texture: what an upscale is for (and small as a PNG)."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 24, (height, width, 3))
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 200], axis=-1)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


def uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


SMALL = picture(128, 128)  # x2: 256x256, one tile
WIDE = picture(192, 160, seed=1)  # x2: 384x320, four tiles of 256
LONG = picture(192, 96, seed=2)  # x2: 384x192, two tiles of 256


def job(image: Image.Image = SMALL, **fields) -> dict:
    return {
        "prompt": PROMPT,
        "image": uri(image),
        "upscale": {"factor": 2.0},
        "seed": 3,
        "num_inference_steps": 2,
        **fields,
    }


def pixels(output: dict) -> np.ndarray:
    return np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def tiled(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """Tiles of 256 pixels (below UPSCALE_TILE's 512: set directly, as only a test does) and a
    tiny Tile ControlNet from its single-file release."""
    root = tmp_path_factory.mktemp("tile")
    file = save_tile_controlnet(tiny_model, root)
    save_lora(*make_lora(tiny_model, seed=5), root / "loras" / "style.safetensors", "kohya")
    return Worker.start(
        Settings(
            model=str(tiny_model),
            safety_checker_model="none",
            tile_controlnet_model=str(file),
            upscale_tile=256,
            lora_dirs=(str(root / "loras"),),
        )
    )


def without_tile_controlnet(worker: Worker) -> ZImageGenerator:
    """The same loaded model, tiles and device, and no Tile ControlNet."""
    generator = worker.generator
    return ZImageGenerator(generator.text_to_image, generator.device, parts={"upscale_tile": 256})


# ------------------------------------------------------------------- the request
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"image": None}, "upscale: needs 'image'"),
        ({"mask": "x"}, "upscale: is not allowed together with 'mask'"),
        ({"outpaint": {"left": 16}}, "upscale: is not allowed together with 'outpaint'"),
        ({"control_image": "x"}, "upscale: is not allowed together with 'control_image'"),
        ({"num_images": 2}, "num_images: 2 is not allowed with 'upscale'"),
        ({"size": "1024*1024"}, "size: '1024*1024' is not allowed with 'upscale'"),
        (
            {"upscale": {"factor": 1.0}},
            "upscale.factor: 1.0 (a number) is not allowed: it must be a number greater than 1.0",
        ),
        ({"upscale": {"factor": 4.5}}, "upscale.factor: 4.5 (a number) is not allowed"),
        ({"upscale": {"factor": "2"}}, "upscale.factor: '2' is not allowed"),
        ({"upscale": {"factor": True}}, "upscale.factor: true (a boolean) is not allowed"),
        ({"upscale": {"scale": 2}}, "upscale.scale: unknown field; allowed fields: factor"),
        ({"upscale": 2}, "upscale: 2 is not allowed: it must be an object"),
        ({"prompt": "   ", "upscale": None}, "prompt: a blank string '   ' is not allowed"),
    ],
)
def test_every_refusal_names_the_field(worker, fields, says):
    request = {key: value for key, value in {**job(), **fields}.items() if value is not None}
    with pytest.raises(JobError) as caught:
        parse_request(request)
    assert str(caught.value).startswith(says), str(caught.value)
    assert handle_job(worker, {"id": "bad", "input": request}) == {"error": str(caught.value)}


def test_defaults_with_upscale_and_a_blank_or_absent_prompt():
    request = parse_request({"image": "x", "upscale": {}})
    assert (request.size, request.strength, request.control_scale) == ("auto", 0.35, TILE_CONTROL_SCALE)
    assert request.upscale.factor == 2.0 and mode_of(request).name == "upscaling"
    assert request.with_prompt("neutral").prompt == "neutral"
    assert (
        parse_request({"image": "x", "upscale": {}, "prompt": "kept"}).with_prompt("neutral").prompt == "kept"
    )
    assert parse_request({"image": "x", "upscale": {}, "control_scale": 0.0}).control_scale == 0.0


@pytest.mark.parametrize(
    ("size", "factor", "output"),
    [
        ((1000, 750), 2.0, "2000*1504"),
        ((123, 77), 3.0, "368*224"),
        ((1024, 1024), 4.0, "4096*4096"),
        ((4000, 3000), 1.02, "4080*3056"),
    ],
)
def test_the_output_is_the_input_times_the_factor_to_the_nearest_16(size, factor, output):
    request = parse_request({"image": "x", "upscale": {"factor": factor}})
    assert request.with_auto_size(size).size == output


def test_past_4096_a_side_names_upscale_factor_and_the_largest_allowed():
    request = parse_request({"image": "x", "upscale": {"factor": 4.0}})
    with pytest.raises(
        JobError,
        match=r"^upscale.factor: 4.0 is not allowed for this 1100x750 image.*largest factor for it is 3.73",
    ):
        request.with_auto_size((1100, 750))
    assert (
        request.model_copy(update={"upscale": request.upscale.model_copy(update={"factor": 3.73})})
        .with_auto_size((1100, 750))
        .width
        == 4096
    )
    assert largest_factor(4096, 100) == 1.0
    with pytest.raises(JobError, match="too large to upscale"):
        parse_request({"image": "x", "upscale": {"factor": 1.01}}).with_auto_size((4096, 100))


def test_settings():
    assert Settings.from_env({}).upscale_tile == 1024 and Settings.from_env({}).upscale_prompt
    settings = Settings.from_env(
        {
            "UPSCALE_TILE": "768",
            "UPSCALE_PROMPT": "crisp",
            "UPSCALE_PRICE_PER_MP_USD": "0.01",
            "TILE_CONTROLNET_MODEL": "/x.safetensors",
        }
    )
    assert (settings.upscale_tile, settings.upscale_prompt, settings.upscale_price_per_mp_usd) == (
        768,
        "crisp",
        0.01,
    )
    assert settings.tile_control_enabled and not Settings().tile_control_enabled
    for bad in ("500", "2064", "520", "abc"):
        with pytest.raises(SettingsError, match="UPSCALE_TILE"):
            Settings.from_env({"UPSCALE_TILE": bad})


# ------------------------------------------------------------------- tiles and weights
@pytest.mark.parametrize(
    ("height", "width", "tile"),
    [(32, 32, 32), (48, 40, 32), (512, 512, 128), (256, 200, 128), (226, 512, 64)],
)
def test_blend_weights_sum_to_one_everywhere_and_ramp_across_overlaps(height, width, tile):
    views = tiles.views(height, width, tile, 2)
    weights = tiles.weights(height, width, tile, 2)
    total = torch.zeros(height, width)
    for view, weight in zip(views, weights, strict=True):
        assert view.height <= tile and view.width <= tile and view.top % 2 == 0 and view.left % 2 == 0
        assert weight.shape == (view.height, view.width) and bool((weight > 0).all())
        view.of(total).add_(weight)
    assert torch.allclose(total, torch.ones(height, width), atol=1e-6)
    if len(views) > 1:  # the first tile's weight is 1 at the canvas's corner, falls towards a shared edge
        assert weights[0][0, 0] == 1.0 and weights[0][-1, -1] < 0.5


def test_a_canvas_of_one_tile_is_one_view_and_more_overlap_by_a_quarter():
    assert tiles.views(128, 96, 128, 2) == [tiles.View(0, 0, 128, 96)]
    assert tiles.spans(512, 128, 2) == [(0, 128), (96, 224), (192, 320), (288, 416), (384, 512)]
    assert len(tiles.views(512, 512, 128, 2)) == 25  # 4096x4096 in tiles of 1024


# ------------------------------------------------------------------- the refine
def test_strength_zero_returns_the_lanczos_resample_exactly(worker):
    output = run_input(worker, "zero", job(strength=0.0))
    expected = np.asarray(SMALL.resize((256, 256), Image.Resampling.LANCZOS)).astype(int)
    assert np.array_equal(pixels(output), expected)
    assert output["timings"]["refine"] == 0.0 and output["timings"]["resample"] > 0.0
    assert (output["width"], output["height"]) == (256, 256)


def test_one_tile_equals_diffusers_img2img_on_the_resample(worker):
    output = run_input(worker, "one", job(strength=0.5, num_inference_steps=4))
    resampled = SMALL.resize((256, 256), Image.Resampling.LANCZOS)
    pipe = ZImageImg2ImgPipeline(**worker.generator.text_to_image.components)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=PROMPT,
        image=resampled,
        strength=0.5,
        height=256,
        width=256,
        num_inference_steps=4,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
    ).images[0]
    assert np.abs(pixels(output) - (expected * 255).round().astype(int)).max() <= 2
    timings = output["timings"]
    assert timings["refine"] > 0 and timings["denoise"] == 0.0
    assert output["cost"] == round(0.005 * 256 * 256 / 1024**2, 6)


def test_several_tiles_are_deterministic_report_tile_steps_and_cost_per_megapixel(tiled):
    steps: list[tuple[int, int]] = []
    first = run_input(tiled, "a", job(WIDE, strength=0.5), lambda done, total: steps.append((done, total)))
    again = run_input(tiled, "b", job(WIDE, strength=0.5))
    assert first["image_url"] == again["image_url"]
    assert (first["width"], first["height"]) == (384, 320)
    # 0.5 of 2 steps runs 1, over four tiles: 4 tile steps.
    assert steps == [(done, 4) for done in range(1, 5)]
    assert first["cost"] == round(0.005 * 384 * 320 / 1024**2, 6)
    other = run_input(tiled, "c", job(WIDE, strength=0.5, seed=4))
    assert other["image_url"] != first["image_url"]


def test_the_tile_controlnet_changes_pixels_and_at_scale_zero_does_not(tiled):
    controlled = pixels(run_input(tiled, "tile", job(WIDE, strength=0.5)))
    at_zero = pixels(run_input(tiled, "zero", job(WIDE, strength=0.5, control_scale=0.0)))
    request = parse_request(job(WIDE, strength=0.5)).with_size(384, 320)
    plain = without_tile_controlnet(tiled).generate(request, 3, Stopwatch(), load_inputs(request))
    plain = np.asarray(to_pil(plain)[0]).astype(int)
    assert np.abs(at_zero - plain).max() <= 2
    assert np.abs(controlled - plain).max() > 10


def test_a_stop_ends_the_refine_at_the_next_tile_step(tiled, monkeypatch):
    stop_set = noted_stops(monkeypatch)
    steps: list[int] = []
    asyncio.run(
        _stop_after_first_step(tiled, steps, job(WIDE, strength=1.0, num_inference_steps=8), stop_set)
    )
    assert steps == [1]  # one tile step of 32, then the stop


@pytest.mark.parametrize("level", ["high"])
def test_an_acceleration_level_forecasts_each_tile_from_its_own_steps(tiled, level):
    """One step-cache history per tile: the blocks run on the level's computed steps in every tile,
    and the Tile ControlNet with them (its window counts steps by timestep, not by call)."""
    generator = tiled.generator
    tile_controlnet = generator.pipelines["upscaling"].controlnet
    counts = {"transformer": 0, "controlnet": 0}
    watched = {
        "transformer": generator.text_to_image.transformer.layers[-1].attention,
        "controlnet": tile_controlnet.control_layers[0].attention,
    }
    handles = [
        module.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
        for name, module in watched.items()
    ]
    try:
        fast = pixels(
            run_input(tiled, level, job(LONG, strength=1.0, num_inference_steps=6, acceleration=level))
        )
    finally:
        for handle in handles:
            handle.remove()
    computed = steps_computed(LEVELS["z-image-turbo"][level], 6)
    assert computed < 6 and counts == {"transformer": 2 * computed, "controlnet": 2 * computed}
    assert fast.shape == (192, 384, 3)
    registries = [getattr(m, "_diffusers_hook", None) for m in generator.text_to_image.transformer.modules()]
    assert all(registry is None or not registry.hooks for registry in registries)


# ------------------------------------------------------------------- 16 MP through a bucket
def test_a_4096x4096_output_goes_through_a_bucket(worker, s3):  # noqa: F811
    settings = replace(
        worker.settings,
        bucket_endpoint_url=s3.url,
        bucket_access_key_id=KEY_ID,
        bucket_secret_access_key=SECRET,
        bucket_name=BUCKET,
    )
    stored = replace(worker, settings=settings, storage=Storage(settings))
    source = picture(1024, 1024, seed=5)
    # Strength 0: the resample itself, so the check is the size rule, the bytes and the delivery.
    output = run_input(stored, "big", job(source, upscale={"factor": 4.0}, strength=0.0))
    assert (output["width"], output["height"]) == (4096, 4096)
    assert output["image_url"].startswith(s3.url)
    delivered = Image.open(io.BytesIO(requests.get(output["image_url"], timeout=30).content))
    expected = source.resize((4096, 4096), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(delivered), np.asarray(expected))
    assert output["cost"] == round(0.005 * 16, 6)


def test_past_one_tile_the_vae_encodes_and_decodes_the_canvas_in_tiles(tiled, monkeypatch):
    vae = tiled.generator.text_to_image.vae
    calls = {"_tiled_encode": 0, "tiled_decode": 0}
    for name in calls:
        original = getattr(vae, name)

        def counted(*args, name=name, original=original, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(vae, name, counted)
    output = run_input(tiled, "vae", job(picture(320, 192, seed=4), strength=0.5))
    assert (output["width"], output["height"]) == (640, 384)  # past the VAE's 512-pixel tiles
    assert calls == {"_tiled_encode": 1, "tiled_decode": 1}
    assert vae.use_tiling is False  # the next job's VAE as it was
    run_input(tiled, "small", job(strength=0.5))  # one tile: no VAE tiles
    assert calls == {"_tiled_encode": 1, "tiled_decode": 1}


def test_the_openai_edits_route_takes_upscale_through_extra_body(worker):
    body = {
        "prompt": PROMPT,
        "image": uri(SMALL),
        "seed": 3,
        "num_inference_steps": 2,
        "upscale": {"factor": 2.0},
    }
    job = {"openai_route": "/v1/images/edits", "openai_input": body}
    reply = asyncio.run(OpenAIImages(worker).handle({"id": "openai", "input": job}))
    assert reply["size"] == "256x256", reply
    assert reply["data"][0]["url"] == run_input(worker, "native", body)["image_url"]


def test_a_lora_applies_to_every_tile(tiled):
    plain = pixels(run_input(tiled, "plain", job(LONG, strength=0.5)))
    styled = run_input(
        tiled, "lora", job(LONG, strength=0.5, loras=[{"path": "style.safetensors", "scale": 2.0}])
    )
    assert (styled["width"], styled["height"]) == (384, 192)
    assert np.abs(pixels(styled) - plain).max() > 10
    again = run_input(tiled, "again", job(LONG, strength=0.5))
    assert np.array_equal(pixels(again), plain)  # the base weights again


def test_seed_variance_switches_to_the_clean_embeddings_at_a_step_s_end_in_every_tile(tiled):
    """4 steps over four tiles, until 0.5: every tile of steps 0 and 1 gets E', of steps 2 and 3 E."""
    fed: list[torch.Tensor] = []
    transformer = tiled.generator.text_to_image.transformer
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(args[2][0].clone()), with_kwargs=True
    )
    setting = {"strength": 2.0, "fraction": 1.0, "until": 0.5}
    try:
        varied = run_input(tiled, "sv", job(WIDE, strength=1.0, num_inference_steps=4, seed_variance=setting))
    finally:
        hook.remove()
    assert len(fed) == 4 * 4
    clean = fed[-1]
    assert all(not torch.equal(embeds, clean) for embeds in fed[:8])
    assert all(torch.equal(embeds, clean) for embeds in fed[8:])
    plain = run_input(tiled, "plain", job(WIDE, strength=1.0, num_inference_steps=4))
    assert varied["image_url"] != plain["image_url"]
