"""The base model (`"model": "z-image"`) beside Turbo in the other modes: inpainting, LoRAs, prices.

Real pipelines on tiny weights (tests/test_two_models.py builds the base-shaped folder); each
result is compared with diffusers' own pipeline loaded from the base's folder, with the base's
default guidance 4.0 and a few explicit steps to stay fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageInpaintPipeline, ZImagePipeline
from PIL import Image

from src.inputs.pictures import cover_crop, load_mask
from src.jobs.worker import Worker
from src.runtime.settings import Settings
from tests.conftest import decode_data_uri, handle_job
from tests.test_inpaint import IMAGE, MASK, SOURCE, SOURCE_SIZE
from tests.test_two_models import base_model, both  # noqa: F401
from tests.tiny_loras import make_lora, save_lora

JOB = {"prompt": "a lighthouse in fog", "size": "256*256", "seed": 21, "num_inference_steps": 3}
BASE_GUIDANCE = 4.0  # the base's default: the requests below leave guidance_scale out


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "two-models", "input": {**JOB, **fields}})
    assert "error" not in output, output
    return output


def pixels(uri: str) -> np.ndarray:
    return np.asarray(decode_data_uri(uri).convert("RGB")).astype(int)


def diffusers_call(pipe, **arguments) -> np.ndarray:
    """diffusers' plain call with the job's prompt, size, steps, seed and the base's guidance."""
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt=JOB["prompt"],
        height=256,
        width=256,
        num_inference_steps=JOB["num_inference_steps"],
        guidance_scale=BASE_GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        output_type="np",
        **arguments,
    ).images
    return (images[0] * 255).round().astype(int)


# ------------------------------------------------------------------- inpainting
def test_inpainting_on_the_base_equals_diffusers_and_keeps_the_input(both, base_model):  # noqa: F811
    output = run(both, model="z-image", image=IMAGE, mask=MASK, strength=0.9)
    assert output["model"] == "z-image"
    out = pixels(output["image_url"])
    fitted_image = cover_crop(Image.fromarray(SOURCE), 256, 256)
    fitted_mask = load_mask(MASK, SOURCE_SIZE, 256, 256)
    image, mask = np.asarray(fitted_image).astype(int), np.asarray(fitted_mask).astype(int)
    keep, regenerate = mask == 0, mask == 255
    assert keep.mean() > 0.3 and regenerate.mean() > 0.2

    pipe = ZImageInpaintPipeline.from_pretrained(base_model, dtype=torch.float32, local_files_only=True)
    expected = diffusers_call(pipe, image=fitted_image, mask_image=fitted_mask, strength=0.9)
    assert np.abs(out[regenerate] - expected[regenerate]).max() <= 2
    assert np.array_equal(out[keep], image[keep])
    assert (out[regenerate] != image[regenerate]).mean() > 0.9  # the base model did regenerate them

    # Turbo's weights on the same request give another picture: the job ran on the base.
    turbo = pixels(run(both, image=IMAGE, mask=MASK, strength=0.9, guidance_scale=BASE_GUIDANCE)["image_url"])
    assert np.abs(turbo[regenerate] - out[regenerate]).max() > 20
    assert np.array_equal(turbo[keep], image[keep])


# ------------------------------------------------------------------- LoRAs
@pytest.fixture(scope="module")
def lora_dir(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("base-loras")
    save_lora(*make_lora(base_model, seed=5), folder / "base-style.safetensors", "diffusers")
    save_lora(*make_lora(base_model, seed=6, rank=2, alpha=2.0), folder / "other.safetensors", "kohya")
    return folder


@pytest.fixture(scope="module")
def lora_both(
    tiny_model: Path,
    base_model: Path,  # noqa: F811
    lora_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Worker:
    return Worker.start(
        Settings(
            model=str(tiny_model),
            base_model=str(base_model),
            safety_checker_model="none",
            lora_dirs=(str(lora_dir),),
            lora_cache_dir=str(tmp_path_factory.mktemp("lora-cache")),
        )
    )


def lora_reference(folder: Path, loras: list[tuple[Path, float]]) -> np.ndarray:
    """diffusers alone: load_lora_weights + set_adapters on the base's folder, the plain call."""
    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"adapter{i}")
    pipe.set_adapters([f"adapter{i}" for i in range(len(loras))], [scale for _, scale in loras])
    return diffusers_call(pipe)


def test_a_lora_on_the_base_equals_diffusers(lora_both, lora_dir, base_model):  # noqa: F811
    loras = [("base-style.safetensors", 0.8), ("other.safetensors", -0.6)]
    output = run(lora_both, model="z-image", loras=[{"path": p, "scale": s} for p, s in loras])
    assert output["model"] == "z-image" and output["timings"]["load_loras"] > 0
    ours = pixels(output["image_url"])
    assert np.abs(ours - lora_reference(base_model, [(lora_dir / p, s) for p, s in loras])).max() <= 2
    assert np.abs(ours - pixels(run(lora_both, model="z-image")["image_url"])).max() > 20  # it did change


def test_a_base_lora_does_not_leak_into_the_next_jobs(lora_both, both):  # noqa: F811
    turbo_before = run(lora_both)
    base_before = run(lora_both, model="z-image")
    run(lora_both, model="z-image", loras=[{"path": "base-style.safetensors", "scale": 1.5}])
    turbo_after = run(lora_both)
    assert turbo_after["image_url"] == turbo_before["image_url"] == run(both)["image_url"]
    assert turbo_after["timings"]["load_loras"] == 0
    # The base itself, without `loras`, runs its plain weights again too.
    assert run(lora_both, model="z-image")["image_url"] == base_before["image_url"]
    # And a Turbo LoRA leaves the base alone.
    run(lora_both, loras=[{"path": "base-style.safetensors", "scale": 1.0}])
    assert run(lora_both, model="z-image")["image_url"] == base_before["image_url"]


# ------------------------------------------------------------------- prices
@pytest.mark.parametrize(("model", "cost"), [("z-image", 0.02), ("z-image-turbo", 0.01)])
def test_each_model_charges_its_own_price_per_image(both, model, cost):  # noqa: F811
    output = run(both, model=model, num_images=2, num_inference_steps=2)
    assert output["model"] == model and output["cost"] == cost
    assert [entry["seed"] for entry in output["images"]] == [JOB["seed"], JOB["seed"] + 1]
