"""The real diffusers pipelines on a tiny random Z-Image model, through the worker in-process."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from src.jobs.output import TIMING_KEYS
from src.jobs.worker import Worker
from src.model.modes import MODES
from src.model.pipeline import ZImageGenerator, load_pipeline
from src.request.schema import PRESET_SIZES
from tests.conftest import data_uri_of, decode_data_uri, handle_job, png_bytes, run_input


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "test-job", "input": {"prompt": "a red fox in snow", **fields}})
    assert "error" not in output, output
    return output


def pixels(uri: str) -> np.ndarray:
    return np.asarray(decode_data_uri(uri).convert("RGB"))


def test_load_shares_one_copy_of_every_weight_in_the_right_dtype(tiny_model):
    pipe = load_pipeline(tiny_model, torch.float32)
    generator = ZImageGenerator(pipe, torch.device("cpu"))
    t2i = generator.text_to_image
    # Without a ControlNet the control modes have no pipeline (tests/test_control.py builds them).
    plain = [mode for mode in MODES.values() if not mode.control]
    assert set(generator.pipelines) == {mode.name for mode in plain}
    assert set(generator.refusals) == {mode.name for mode in MODES.values() if mode.control}
    for mode in plain:
        other = generator.pipelines[mode.name]
        assert type(other) is mode.pipeline
        for name in ("transformer", "text_encoder", "vae"):
            a, b = getattr(t2i, name), getattr(other, name)
            assert a is b
            for (pa_name, pa), (pb_name, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
                assert pa_name == pb_name and pa.data_ptr() == pb.data_ptr()
                assert pa.dtype == torch.float32 and pa.device.type == "cpu"
        assert t2i.tokenizer is other.tokenizer and t2i.scheduler is other.scheduler
    assert generator.pipelines["text-to-image"] is t2i


def test_bf16_load_keeps_bf16_in_every_pipeline(tiny_model):
    """On CUDA the worker loads bf16; building the other modes' pipelines must not cast it back to fp32."""
    generator = ZImageGenerator(load_pipeline(tiny_model, torch.bfloat16), torch.device("cpu"))
    for pipe in generator.pipelines.values():
        for name in ("transformer", "text_encoder", "vae"):
            assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}


def test_text_to_image_response_shape(worker):
    output = run(worker, seed=7)
    assert set(output) == {
        "image_url",
        "seed",
        "cost",
        "width",
        "height",
        "output_format",
        "has_nsfw_concepts",
        "timings",
        "model",
        "acceleration",
    }
    assert output["seed"] == 7 and output["cost"] == 0.005 and output["model"] == "z-image-turbo"
    assert output["acceleration"] == "none"
    assert (output["width"], output["height"], output["output_format"]) == (1024, 1024, "png")
    assert output["has_nsfw_concepts"] == [False]
    assert set(output["timings"]) == {*TIMING_KEYS, "total"}
    assert output["timings"]["denoise"] > 0 and output["timings"]["total"] >= output["timings"]["denoise"]
    image = decode_data_uri(output["image_url"])
    assert image.format == "PNG" and image.size == (1024, 1024)


@pytest.mark.parametrize("size", PRESET_SIZES)
def test_every_preset_size(worker, size):
    width, height = (int(side) for side in size.split("*"))
    output = run(worker, size=size, seed=1, num_inference_steps=2, output_format="jpeg")
    assert (output["width"], output["height"]) == (width, height)
    assert decode_data_uri(output["image_url"]).size == (width, height)


@pytest.mark.parametrize(
    ("fmt", "pil_name"), [("png", "PNG"), ("jpeg", "JPEG"), ("jpg", "JPEG"), ("WEBP", "WEBP")]
)
def test_every_format(worker, fmt, pil_name):
    output = run(worker, size="512*512", seed=3, num_inference_steps=2, output_format=fmt, output_quality=80)
    assert output["image_url"].startswith(f"data:image/{pil_name.lower()};base64,")
    assert output["output_format"] == pil_name.lower()
    assert decode_data_uri(output["image_url"]).format == pil_name


def test_same_request_same_bytes(worker):
    first = run(worker, size="512*512", seed=1234)
    second = run(worker, size="512*512", seed=1234)
    other = run(worker, size="512*512", seed=1235)
    assert first["image_url"] == second["image_url"]
    assert first["image_url"] != other["image_url"]


def test_random_seed_is_reported_and_reproduces(worker):
    first = run(worker, size="512*512", num_inference_steps=2)
    assert 0 <= first["seed"] <= 2**32 - 1
    again = run(worker, size="512*512", num_inference_steps=2, seed=first["seed"])
    assert again["image_url"] == first["image_url"]


def test_num_images_each_with_its_own_seed(worker):
    output = run(worker, size="512*512", seed=100, num_images=3, num_inference_steps=2)
    assert [entry["seed"] for entry in output["images"]] == [100, 101, 102]
    assert output["images"][0]["image_url"] == output["image_url"]
    assert output["cost"] == 0.015 and output["has_nsfw_concepts"] == [False] * 3
    single = run(worker, size="512*512", seed=101, num_inference_steps=2)
    assert (
        np.abs(pixels(single["image_url"]).astype(int) - pixels(output["images"][1]["image_url"])).max() <= 1
    )


def test_seed_wraps_around_2_to_the_32(worker):
    output = run(worker, size="512*512", seed=2**32 - 1, num_images=2, num_inference_steps=1)
    assert [entry["seed"] for entry in output["images"]] == [2**32 - 1, 0]


def test_image_to_image(worker):
    source = data_uri_of(png_bytes((640, 480), (20, 120, 220)))
    output = run(worker, image=source, size="768*512", strength=0.6, seed=5)
    assert decode_data_uri(output["image_url"]).size == (768, 512)
    again = run(worker, image=source, size="768*512", strength=0.6, seed=5)
    assert again["image_url"] == output["image_url"]
    weaker = run(worker, image=source, size="768*512", strength=0.2, seed=5)
    assert weaker["image_url"] != output["image_url"]


def test_image_to_image_batch_matches_single_requests(worker):
    source = data_uri_of(png_bytes((256, 256), (200, 200, 40)))
    batch = run(
        worker, image=source, size="512*512", strength=0.7, seed=9, num_images=2, num_inference_steps=4
    )
    single = run(worker, image=source, size="512*512", strength=0.7, seed=10, num_inference_steps=4)
    diff = np.abs(pixels(batch["images"][1]["image_url"]).astype(int) - pixels(single["image_url"]))
    assert diff.max() <= 1


def test_strength_zero_returns_the_fitted_input_untouched(worker):
    array = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    output = run(worker, image=data_uri_of(buffer.getvalue()), size="256*256", strength=0.0, num_images=2)
    from src.inputs.pictures import cover_crop

    expected = np.asarray(cover_crop(Image.fromarray(array), 256, 256))
    for entry in output["images"]:
        assert np.array_equal(pixels(entry["image_url"]), expected)
    assert output["timings"]["denoise"] == 0.0


def test_guidance_uses_the_negative_prompt(worker):
    plain = run(worker, size="512*512", seed=4, guidance_scale=4.0, num_inference_steps=2)
    negative = run(
        worker, size="512*512", seed=4, guidance_scale=4.0, num_inference_steps=2, negative_prompt="blurry"
    )
    assert plain["image_url"] != negative["image_url"]
    # Without guidance the negative prompt is ignored, as API.md says.
    a = run(worker, size="512*512", seed=4, num_inference_steps=2)
    b = run(worker, size="512*512", seed=4, num_inference_steps=2, negative_prompt="blurry")
    assert a["image_url"] == b["image_url"]


def test_chinese_prompt(worker):
    assert run(worker, prompt="一只在雪地里的红狐狸", size="512*512", num_inference_steps=2)["image_url"]


def test_progress_is_reported_once_per_step(worker):
    steps: list[tuple[int, int]] = []
    run_input(
        worker,
        "progress",
        {"prompt": "a", "size": "512*512", "num_inference_steps": 5},
        lambda s, t: steps.append((s, t)),
    )
    assert steps == [(i, 5) for i in range(1, 6)]


def test_out_of_memory_fails_the_job_and_the_worker_serves_the_next(worker):
    def explode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    hook = worker.generator.text_to_image.transformer.register_forward_pre_hook(explode)
    try:
        failed = handle_job(worker, {"id": "oom", "input": {"prompt": "a", "size": "512*512"}})
    finally:
        hook.remove()
    assert failed["error"].startswith("out of GPU memory for this request")
    assert "Traceback" not in failed["error"]
    assert run(worker, size="512*512", num_inference_steps=1)["image_url"]


def test_unexpected_errors_are_short_and_the_worker_serves_the_next(worker, caplog):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    hook = worker.generator.text_to_image.vae.decoder.register_forward_pre_hook(explode)
    try:
        with caplog.at_level("ERROR"):
            failed = handle_job(worker, {"id": "boom", "input": {"prompt": "a", "size": "512*512"}})
    finally:
        hook.remove()
    assert failed == {"error": "internal error in job boom; the worker logged the details and keeps serving"}
    assert "secret internal detail" in caplog.text  # the traceback is in the log, not the reply
    assert run(worker, size="512*512", num_inference_steps=1)["image_url"]


def test_bad_input_is_an_error_not_a_crash(worker):
    assert handle_job(worker, {"id": "x", "input": {"prompt": "a", "size": "1000*1000"}})["error"].startswith(
        "size:"
    )
    assert handle_job(worker, {"id": "x"})["error"].startswith("input:")


def test_result_over_20_mb_fails_with_advice(worker):
    output = handle_job(
        worker,
        {
            "id": "big",
            "input": {"prompt": "noise", "size": "2048*2048", "num_images": 2, "num_inference_steps": 1},
        },
    )
    message = output["error"]
    assert message.startswith("output: 2 png image(s) at 2048*2048 make a")
    assert "20 MB" in message and "bucket" in message and "jpeg" in message and "fewer images" in message
