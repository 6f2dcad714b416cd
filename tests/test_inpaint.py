"""Inpainting on the real ZImageInpaintPipeline with the tiny random model: kept pixels, blends, faults.

Pictures here are random or graded so every pixel is distinct; a mask has a black (keep)
band, a white (regenerate) band and a grey ramp between, so one job checks all three rules.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from diffusers import ZImageInpaintPipeline
from PIL import Image

from src.inputs.pictures import Inputs, cover_crop, load_mask
from src.jobs.worker import Worker
from src.model.inpaint import InpaintPipeline, composite, keeps_everything
from src.model.pixels import to_bytes
from tests.conftest import Route, data_uri_of, decode_data_uri, handle_job, run_input, worker_env
from tests.test_local_api import run_cli

SOURCE_SIZE = (320, 256)  # wider than the 256*256 output: the fit crops the centre
RNG = np.random.default_rng(7)
SOURCE = RNG.integers(0, 256, (SOURCE_SIZE[1], SOURCE_SIZE[0], 3), dtype=np.uint8)


def banded_mask(size: tuple[int, int] = SOURCE_SIZE) -> np.ndarray:
    """Left: black (keep); right: white (regenerate); middle: a ramp 1..254 across 64 columns."""
    width, height = size
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 + 32 :] = 255
    mask[:, width // 2 - 32 : width // 2 + 32] = np.linspace(1, 254, 64).round().astype(np.uint8)
    return mask


def png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


IMAGE, MASK = png_uri(SOURCE), png_uri(banded_mask())
JOB = {"prompt": "a stone wall", "image": IMAGE, "mask": MASK, "size": "256*256", "num_inference_steps": 4}


def fitted(size: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """The input and mask as the worker fits them: what the kept pixels must equal."""
    image = np.asarray(cover_crop(Image.fromarray(SOURCE), *size)).astype(int)
    mask = np.asarray(load_mask(MASK, SOURCE_SIZE, *size)).astype(int)
    return image, mask


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "inpaint", "input": {**JOB, **fields}})
    assert "error" not in output, output
    return output


def failure(worker: Worker, **fields) -> str:
    output = handle_job(worker, {"id": "bad-mask", "input": {**JOB, **fields}})
    assert set(output) == {"error"}, output
    return output["error"]


def pixels(uri: str) -> np.ndarray:
    return np.asarray(decode_data_uri(uri).convert("RGB")).astype(int)


class DecodedImages:
    """What the pipeline decoded, before the composite: read with a forward hook on the real VAE."""

    def __init__(self, worker: Worker) -> None:
        self.pipe = worker.generator.pipelines["inpainting"]
        self.outputs: list[torch.Tensor] = []
        self.hook = self.pipe.vae.decoder.register_forward_hook(lambda m, a, out: self.outputs.append(out))

    def bytes(self) -> np.ndarray:
        (decoded,) = self.outputs
        images = self.pipe.image_processor.postprocess(decoded, output_type="pt")
        return to_bytes(images).permute(0, 2, 3, 1).numpy().astype(int)

    def __enter__(self) -> DecodedImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hook.remove()


# ------------------------------------------------------------------- on the worker
def test_kept_pixels_are_the_input_masked_ones_generated_and_grey_blends(worker):
    with DecodedImages(worker) as decoded:
        output = run(worker, seed=3, strength=1.0)
    out, (image, mask) = pixels(output["image_url"]), fitted()
    generated = decoded.bytes()[0]
    keep, regenerate, grey = mask == 0, mask == 255, (mask > 0) & (mask < 255)
    assert keep.mean() > 0.3 and regenerate.mean() > 0.2 and grey.mean() > 0.1
    assert np.array_equal(out[keep], image[keep])
    assert np.array_equal(out[regenerate], generated[regenerate])
    assert (out[regenerate] != image[regenerate]).mean() > 0.9  # the model did change them
    m = mask[..., None] / 255
    expected = np.round(image * (1 - m) + generated * m)
    assert np.array_equal(out[grey], expected[grey])
    # diffusers alone returns the VAE's copy of the kept area, which is not the input.
    assert (generated[keep] != image[keep]).mean() > 0.5


def test_same_request_same_bytes(worker):
    first, second = run(worker, seed=11), run(worker, seed=11)
    assert first["image_url"] == second["image_url"]
    assert run(worker, seed=12)["image_url"] != first["image_url"]
    assert run(worker, seed=11, strength=0.5)["image_url"] != first["image_url"]


def test_several_images_each_keep_the_input_and_match_single_requests(worker):
    output = run(worker, seed=40, num_images=3)
    assert [entry["seed"] for entry in output["images"]] == [40, 41, 42]
    assert output["cost"] == 0.015 and output["has_nsfw_concepts"] == [False] * 3
    image, mask = fitted()
    batch = [pixels(entry["image_url"]) for entry in output["images"]]
    for out in batch:
        assert np.array_equal(out[mask == 0], image[mask == 0])
    assert not np.array_equal(batch[0], batch[1])
    single = pixels(run(worker, seed=41)["image_url"])
    assert np.abs(single - batch[1]).max() <= 1


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_every_output_format(worker, fmt):
    output = run(worker, seed=5, num_images=2, output_format=fmt, output_quality=90)
    image, mask = fitted()
    for entry in output["images"]:
        picture = decode_data_uri(entry["image_url"])
        assert picture.format == fmt.upper() and picture.size == (256, 256)
        if fmt == "png":  # lossless: the kept area is exact; jpeg and webp are lossy everywhere
            assert np.array_equal(pixels(entry["image_url"])[mask == 0], image[mask == 0])


def test_other_sizes_fit_image_and_mask_alike(worker):
    output = run(worker, seed=2, size="512*256", num_inference_steps=2)
    image, mask = fitted((512, 256))
    out = pixels(output["image_url"])
    assert out.shape == (256, 512, 3) and np.array_equal(out[mask == 0], image[mask == 0])


def test_an_all_black_mask_returns_the_fitted_input_without_the_model(worker):
    black = png_uri(np.zeros((SOURCE_SIZE[1], SOURCE_SIZE[0]), dtype=np.uint8))
    output = run(worker, mask=black, num_images=2, seed=1)
    image, _ = fitted()
    for entry in output["images"]:
        assert np.array_equal(pixels(entry["image_url"]), image)
    assert output["timings"]["denoise"] == 0.0 and output["timings"]["encode_prompt"] == 0.0


def test_progress_counts_the_steps_strength_leaves(worker):
    steps: list[tuple[int, int]] = []
    run_input(
        worker,
        "progress",
        {**JOB, "num_inference_steps": 8, "strength": 0.5},
        lambda s, t: steps.append((s, t)),
    )
    assert steps == [(i, 4) for i in range(1, 5)]


def test_guidance_and_the_negative_prompt_apply(worker):
    plain = run(worker, seed=4, guidance_scale=3.0, num_inference_steps=2)
    negative = run(worker, seed=4, guidance_scale=3.0, num_inference_steps=2, negative_prompt="blurry")
    assert plain["image_url"] != negative["image_url"]
    image, mask = fitted()
    assert np.array_equal(pixels(negative["image_url"])[mask == 0], image[mask == 0])


def test_the_pipeline_is_diffusers_bit_for_bit_with_one_vae_encode_per_image_not_two(worker):
    """The skipped masked-image encode is one Z-Image's loop never reads: the latents do not move."""
    ours = worker.generator.pipelines["inpainting"]
    stock = ZImageInpaintPipeline(**ours.components)
    stock.set_progress_bar_config(disable=True)
    assert type(ours) is InpaintPipeline and type(stock) is not InpaintPipeline
    image = cover_crop(Image.fromarray(SOURCE), 256, 256)
    mask = load_mask(MASK, SOURCE_SIZE, 256, 256)
    embeds = worker.generator.prompts.embed(JOB["prompt"])

    def latents_and_encodes(pipe) -> tuple[torch.Tensor, int]:
        encodes: list[int] = []
        hook = pipe.vae.encoder.register_forward_hook(lambda m, a, out: encodes.append(a[0].shape[0]))
        try:
            latents = pipe(
                prompt_embeds=[embeds],
                image=[image] * 2,
                mask_image=mask,
                strength=0.9,
                height=256,
                width=256,
                num_inference_steps=3,
                guidance_scale=0.0,
                num_images_per_prompt=2,
                generator=[torch.Generator().manual_seed(seed) for seed in (5, 6)],
                output_type="latent",
            ).images
        finally:
            hook.remove()
        return latents, sum(encodes)

    latents, encodes = latents_and_encodes(ours)
    reference, reference_encodes = latents_and_encodes(stock)
    assert torch.equal(latents, reference)
    assert (encodes, reference_encodes) == (2, 4)  # images VAE-encoded: one each, against two each


# ------------------------------------------------------------------- bad masks
def test_a_mask_without_an_image_is_refused(worker):
    message = failure(worker, image=None)
    assert message.startswith("mask: needs 'image'"), message


def test_a_mask_of_another_size_is_refused_with_both_sizes(worker):
    message = failure(worker, mask=png_uri(banded_mask((256, 256))))
    assert message.startswith("mask: 256x256 does not match the image's 320x256: "), message


@pytest.mark.parametrize(
    ("mask", "says"),
    [
        (data_uri_of(b"<html>not a picture</html>"), "mask: not an image in a supported format"),
        ("!!!not base64!!!", "mask: not valid base64"),
        ("ftp://127.0.0.1/mask.png", "mask: the URL scheme 'ftp' is not allowed"),
        (123, "mask: 123 is not allowed: it must be an http(s) URL"),
        ("", "mask: a blank string '' is not allowed"),
        ([MASK], "mask: a list is not allowed"),
    ],
)
def test_a_mask_that_is_not_an_image_is_refused_naming_mask(worker, mask, says):
    assert failure(worker, mask=mask).startswith(says)


def test_mask_url_faults_name_the_mask(worker, image_server, allow_loopback_downloads):
    image_server.routes["/mask.png"] = Route(b"nope", status=404)
    message = failure(worker, mask=f"{image_server.url}/mask.png?X-Amz-Signature=secret")
    assert message.startswith(f"mask: fetching {image_server.url}/mask.png failed with HTTP 404"), message
    assert "secret" not in message


def test_mask_urls_obey_the_ssrf_rules(worker, monkeypatch):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)
    message = failure(worker, mask="http://169.254.169.254/latest/meta-data/")
    assert message.startswith("mask: http://169.254.169.254/latest/meta-data/ is refused"), message


def test_a_mask_from_a_url_is_fetched(worker, image_server, allow_loopback_downloads):
    buffer = io.BytesIO()
    Image.fromarray(banded_mask()).save(buffer, format="PNG")
    image_server.routes["/mask.png"] = Route(buffer.getvalue(), headers={"Content-Type": "image/png"})
    assert (
        run(worker, seed=3, strength=1.0)["image_url"]
        == run(worker, seed=3, strength=1.0, mask=f"{image_server.url}/mask.png")["image_url"]
    )


# ------------------------------------------------------------------- the composite itself
def test_composite_is_exact_at_both_ends_even_in_bf16():
    image = Image.fromarray(RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ramp = np.tile(np.arange(0, 256, 17, dtype=np.uint8), (16, 1))  # 0, 17, ..., 255
    inputs = Inputs(image, Image.fromarray(ramp))
    generated = torch.rand(2, 3, 16, 16).to(torch.bfloat16)
    out = to_bytes(composite(generated, inputs)).permute(0, 2, 3, 1).numpy()
    made = to_bytes(generated).float().permute(0, 2, 3, 1).numpy()
    kept = np.asarray(image, dtype=float)
    m = ramp[..., None] / 255
    assert np.array_equal(out[:, :, 0], np.broadcast_to(kept[:, 0], out[:, :, 0].shape))
    assert np.array_equal(out[:, :, -1], made[:, :, -1])
    assert np.array_equal(out, np.round(kept * (1 - m) + made * m))


def test_keeps_everything_only_for_an_all_black_mask():
    assert keeps_everything(Image.new("L", (8, 8), 0))
    assert not keeps_everything(Image.new("L", (8, 8), 1))
    assert not keeps_everything(None)


# ------------------------------------------------------------------- outside the process
def small_job() -> dict:
    """Small enough for a command line: a smooth 64x64 picture and its mask."""
    gradient = np.linspace(0, 255, 64).astype(np.uint8)
    picture = np.stack(
        [np.tile(gradient, (64, 1)), np.tile(gradient[:, None], (1, 64)), 255 - np.tile(gradient, (64, 1))],
        -1,
    )
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return {
        "prompt": "a window",
        "image": png_uri(picture),
        "mask": png_uri(mask),
        "size": "256*256",
        "seed": 9,
        "num_inference_steps": 2,
    }


def test_through_the_local_api(api):
    job = small_job()
    reply = api.runsync(job)
    assert reply["status"] == "COMPLETED", reply
    out = pixels(reply["output"]["image_url"])
    image = np.asarray(cover_crop(decode_data_uri(job["image"]), 256, 256)).astype(int)
    mask = np.asarray(load_mask(job["mask"], (64, 64), 256, 256))
    assert np.array_equal(out[mask == 0], image[mask == 0])
    assert (out[mask == 255] != image[mask == 255]).mean() > 0.9
    failed = api.runsync({**job, "image": None})
    assert failed["status"] == "FAILED" and failed["error"].startswith("mask: needs 'image'")


def test_through_test_input(tiny_model):
    done = run_cli(worker_env(tiny_model), "--test_input", json.dumps({"input": small_job()}))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "inpainting" in done.stdout + done.stderr
