"""Structural control on the real ZImageControlNet pipelines with tiny random ControlNets on the CPU.

The worker's pixels are checked against diffusers' own ZImageControlNetPipeline and
ZImageControlNetInpaintPipeline, loaded separately from disk and called with the same prepared
control map and seed; nothing in the pipeline is mocked.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ZImageControlNetInpaintPipeline,
    ZImageControlNetModel,
    ZImageControlNetPipeline,
    ZImagePipeline,
)
from PIL import Image

from src.control.preprocess import CANNY_HIGH, CANNY_LOW, load_control
from src.inputs.pictures import cover_crop, load_mask
from src.jobs.worker import Worker
from src.request.parse import parse_request
from src.runtime.settings import Settings
from tests.conftest import data_uri_of, decode_data_uri, handle_job
from tests.tiny_controlnets import build_tiny_depth, save_controlnet
from tests.tiny_loras import make_lora, save_lora

SIZE = (256, 256)
RNG = np.random.default_rng(3)


def png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


def shapes(side_x: int = 320, side_y: int = 256) -> np.ndarray:
    """A picture with clear edges (a disc on stripes) and a little noise: canny finds the shapes."""
    y, x = np.mgrid[:side_y, :side_x]
    picture = (x // 40 % 2 * 120 + ((x - 160) ** 2 + (y - 128) ** 2 < 70**2) * 100).astype(np.uint8)
    noisy = picture[..., None] + RNG.integers(0, 20, (side_y, side_x, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


SOURCE = shapes()
CONTROL, OTHER_CONTROL = png_uri(SOURCE), png_uri(np.ascontiguousarray(SOURCE[::-1, ::-1]))
IMAGE = png_uri(RNG.integers(0, 256, (256, 320, 3), dtype=np.uint8))
MASK_ARRAY = np.zeros((256, 320), dtype=np.uint8)
MASK_ARRAY[:, 160:] = 255
MASK = png_uri(MASK_ARRAY)
JOB = {"prompt": "a house", "control_image": CONTROL, "size": "256*256", "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def releases(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("controlnets")
    return {
        version: save_controlnet(tiny_model, version, root / version) for version in ("1.0", "2.0", "2.1")
    }


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_depth(tmp_path_factory.mktemp("depth") / "tiny-depth")


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("control-loras")
    save_lora(*make_lora(tiny_model, seed=5), folder / "style.safetensors", "kohya")
    return folder


@pytest.fixture(scope="module")
def worker21(tiny_model, releases, depth_model, lora_dir) -> Worker:
    """A 2.1 ControlNet from alibaba-pai's single-file form, the tiny depth model, a LoRA folder."""
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        controlnet_model=str(releases["2.1"][1]),
        depth_model=str(depth_model),
        lora_dirs=(str(lora_dir),),
    )
    return Worker.start(settings)


@pytest.fixture(scope="module")
def worker10(tiny_model, releases) -> Worker:
    """A 1.0 ControlNet from a diffusers folder; depth off."""
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        controlnet_model=str(releases["1.0"][0]),
        depth_model="none",
    )
    return Worker.start(settings)


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "control", "input": {**JOB, **fields}})
    assert "error" not in output, output
    return output


def failure(worker: Worker, **fields) -> str:
    output = handle_job(worker, {"id": "bad-control", "input": {**JOB, **fields}})
    assert set(output) == {"error"}, output
    return output["error"]


def pixels(output: dict) -> np.ndarray:
    return np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(int)


def diffusers_pipeline(cls, tiny_model: Path, controlnet_folder: Path):
    """diffusers alone, from disk: its own copies of every weight."""
    base = ZImagePipeline.from_pretrained(tiny_model)
    controlnet = ZImageControlNetModel.from_pretrained(controlnet_folder)
    pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -------------------------------------------------------------- same pixels as diffusers
def test_text_to_image_with_control_equals_diffusers(worker21, tiny_model, releases):
    output = run(worker21, control_scale=0.9, num_images=2)
    pipe = diffusers_pipeline(ZImageControlNetPipeline, tiny_model, releases["2.1"][0])
    control = load_control(parse_request(JOB))
    expected = pipe(
        prompt=JOB["prompt"],
        control_image=control,
        controlnet_conditioning_scale=0.9,
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (3, 4)],
        output_type="np",
    ).images
    for entry, reference in zip(output["images"], expected, strict=True):
        out = np.asarray(decode_data_uri(entry["image_url"]).convert("RGB")).astype(int)
        assert np.abs(out - np.round(reference * 255)).max() <= 2


def test_inpainting_with_control_equals_diffusers_where_masked_and_keeps_the_rest(
    worker21, tiny_model, releases
):
    output = run(worker21, image=IMAGE, mask=MASK)
    pipe = diffusers_pipeline(ZImageControlNetInpaintPipeline, tiny_model, releases["2.1"][0])
    request = parse_request({**JOB, "image": IMAGE, "mask": MASK})
    image = cover_crop(Image.open(io.BytesIO(_payload(IMAGE))), *SIZE)
    mask = load_mask(MASK, (320, 256), *SIZE)
    expected = pipe(
        prompt=JOB["prompt"],
        image=image,
        mask_image=mask,
        control_image=load_control(request),
        controlnet_conditioning_scale=0.75,
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images[0]
    out, kept = pixels(output), np.asarray(mask) == 0
    assert kept.mean() == 0.5
    assert np.abs(out[~kept] - np.round(expected * 255)[~kept]).max() <= 2
    assert np.array_equal(out[kept], np.asarray(image).astype(int)[kept])  # exact, as plain inpainting


def _payload(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


# -------------------------------------------------------------------- control matters
def test_control_changes_the_picture(worker21, worker):
    with_control = pixels(run(worker21))
    plain = pixels(
        handle_job(worker21, {"id": "plain", "input": {k: v for k, v in JOB.items() if k != "control_image"}})
    )
    assert np.abs(with_control - plain).mean() > 1
    assert not np.array_equal(pixels(run(worker21, control_image=OTHER_CONTROL)), with_control)
    assert not np.array_equal(pixels(run(worker21, control_scale=0.2)), with_control)
    assert np.array_equal(pixels(run(worker21)), with_control)  # same request, same bytes
    # The plain mode on a worker with a ControlNet is the plain mode of one without.
    no_control = handle_job(
        worker, {"id": "plain", "input": {k: v for k, v in JOB.items() if k != "control_image"}}
    )
    assert np.array_equal(pixels(no_control), plain)


def test_canny_makes_an_edge_map(worker21):
    request = parse_request({**JOB, "control_preprocess": "canny"})
    edges = np.asarray(load_control(request))
    assert edges.shape == (256, 256, 3) and set(np.unique(edges)) == {0, 255}
    assert 0.01 < (edges[..., 0] == 255).mean() < 0.3  # the shapes' outlines, not the noise
    import cv2

    fitted = np.asarray(cover_crop(Image.fromarray(SOURCE), *SIZE))
    assert np.array_equal(
        edges[..., 0], cv2.Canny(cv2.cvtColor(fitted, cv2.COLOR_RGB2GRAY), CANNY_LOW, CANNY_HIGH)
    )
    output = run(worker21, control_preprocess="canny")
    assert not np.array_equal(pixels(output), pixels(run(worker21)))
    assert output["timings"]["preprocess_control"] > 0


def test_depth_makes_a_grey_map_on_the_gpu_stage(worker21):
    picture = cover_crop(Image.fromarray(SOURCE), *SIZE)
    depth = np.asarray(worker21.depth(picture))
    assert depth.shape == (256, 256, 3)
    assert np.array_equal(depth[..., 0], depth[..., 1]) and np.array_equal(depth[..., 0], depth[..., 2])
    assert depth.min() == 0 and depth.max() == 255  # stretched to the full range
    output = run(worker21, control_preprocess="depth")
    assert not np.array_equal(pixels(output), pixels(run(worker21)))
    assert output["timings"]["preprocess_control"] > 0


def test_timings_report_preprocess_control(worker21):
    assert run(worker21)["timings"]["preprocess_control"] > 0
    plain = handle_job(
        worker21, {"id": "plain", "input": {"prompt": "a", "size": "256*256", "num_inference_steps": 1}}
    )
    assert plain["timings"]["preprocess_control"] == 0.0


def test_loras_apply_with_control(worker21):
    base = pixels(run(worker21))
    styled = pixels(run(worker21, loras=[{"path": "style.safetensors", "scale": 1.0}]))
    assert np.abs(styled - base).mean() > 1
    assert np.array_equal(pixels(run(worker21)), base)  # and are gone again after


def test_the_controlnet_shares_every_weight_with_the_other_modes(worker21):
    generator = worker21.generator
    base = generator.text_to_image
    pointers = {
        p.data_ptr()
        for name in ("transformer", "vae", "text_encoder")
        for p in getattr(base, name).parameters()
    }
    control = generator.pipelines["text-to-image with control"]
    inpaint = generator.pipelines["inpainting with control"]
    assert control.controlnet is inpaint.controlnet
    for pipe in (control, inpaint):
        for name in ("transformer", "vae", "text_encoder"):
            assert all(p.data_ptr() in pointers for p in getattr(pipe, name).parameters())
    # The embedders and refiners it runs are the transformer's own modules, not copies.
    controlnet = control.controlnet
    assert controlnet.noise_refiner is base.transformer.noise_refiner
    assert controlnet.t_embedder is base.transformer.t_embedder
    own = [p for n, p in controlnet.named_parameters() if n.startswith("control_")]
    assert own and not {p.data_ptr() for p in own} & pointers


# ------------------------------------------------------------------ what is refused
def test_a_worker_without_a_controlnet_refuses_control_image(worker):
    message = failure(worker)
    assert message.startswith(
        "control_image: this worker has no ControlNet (started with CONTROLNET_MODEL=none)"
    )


def test_a_1_0_controlnet_serves_text_to_image_and_refuses_inpainting(worker10):
    assert pixels(run(worker10)).shape == (256, 256, 3)
    message = failure(worker10, image=IMAGE, mask=MASK)
    assert message.startswith("control_image: inpainting with control needs a 2.x ControlNet"), message
    assert "control_in_dim 16" in message


def test_depth_off_is_refused_naming_control_preprocess(worker10):
    message = failure(worker10, control_preprocess="depth")
    assert message.startswith(
        "control_preprocess: 'depth' is not available on this worker (DEPTH_MODEL=none)"
    )
    assert pixels(run(worker10, control_preprocess="canny")).shape == (256, 256, 3)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"control_image": None, "control_scale": 1.0}, "control_scale: only applies with 'control_image'"),
        ({"control_image": None, "control_preprocess": "canny"}, "control_preprocess: only applies with"),
        ({"image": IMAGE}, "control_image: is not allowed with 'image' alone"),
        (
            {"image": IMAGE, "mask": MASK, "strength": 0.5},
            "strength: does not apply to inpainting with control",
        ),
        ({"control_image": "!!!"}, "control_image: not valid base64"),
        ({"control_image": data_uri_of(b"<html>")}, "control_image: not an image in a supported format"),
        ({"control_image": "ftp://127.0.0.1/c.png"}, "control_image: the URL scheme 'ftp' is not allowed"),
        ({"control_image": "http://127.0.0.1/c.png"}, "control_image: http://127.0.0.1/c.png is refused"),
    ],
)
def test_bad_control_requests_name_the_field(worker21, fields, says):
    assert failure(worker21, **fields).startswith(says)


@pytest.fixture(scope="module")
def worker20(tiny_model, releases) -> Worker:
    """A 2.0 ControlNet (its refiner hints come from its control layers) from the folder holding the file."""
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        controlnet_model=str(releases["2.0"][1].parent),
        depth_model="none",
    )
    return Worker.start(settings)


def test_a_2_0_controlnet_with_guidance_equals_diffusers(worker20, tiny_model, releases):
    fields = {"guidance_scale": 2.0, "negative_prompt": "blurry", "control_preprocess": "canny"}
    output = run(worker20, **fields)
    pipe = diffusers_pipeline(ZImageControlNetPipeline, tiny_model, releases["2.0"][0])
    expected = pipe(
        prompt=JOB["prompt"],
        negative_prompt="blurry",
        control_image=load_control(parse_request({**JOB, **fields})),
        controlnet_conditioning_scale=0.75,
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images[0]
    assert np.abs(pixels(output) - np.round(expected * 255)).max() <= 2
    assert pixels(run(worker20, image=IMAGE, mask=MASK)).shape == (256, 256, 3)  # 2.0 inpaints too


def test_warm_up_runs_the_control_pipeline_too(worker21):
    calls: list[int] = []
    controlnet = worker21.generator.pipelines["text-to-image with control"].controlnet
    hook = controlnet.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        worker21.generator.warm_up()
    finally:
        hook.remove()
    assert len(calls) == 2  # two steps of the 512x512 warm-up job
