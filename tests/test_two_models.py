"""Two models on one worker: Turbo and a base-shaped model (other transformer weights, the same
text encoder, tokenizer and VAE files), on the tiny real pipeline classes.

The worker's pixels are compared with diffusers' own pipeline loaded from each model's folder;
the shared components must be the very same tensors, and defaults and prices follow the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline

from builder.tiny_model import build_tiny_base, tiny_pipeline
from src.inputs.pictures import cover_crop
from src.jobs.worker import Worker
from src.model.family import same_files
from src.request.parse import parse_request
from src.runtime.settings import Settings, SettingsError
from tests.conftest import data_uri_of, decode_data_uri, handle_job, png_bytes, run_input

JOB = {"prompt": "a red kite over dunes", "size": "256*256", "seed": 4}


@pytest.fixture(scope="module")
def base_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Turbo's folder with a transformer of other weights: what Z-Image (base) is to Turbo."""
    return build_tiny_base(tiny_model, tmp_path_factory.mktemp("base") / "tiny-zimage-base")


@pytest.fixture(scope="module")
def both(tiny_model: Path, base_model: Path) -> Worker:
    return Worker.start(
        Settings(model=str(tiny_model), base_model=str(base_model), safety_checker_model="none")
    )


def pixels(output: dict) -> np.ndarray:
    assert "error" not in output, output
    return np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(int)


def diffusers_pixels(folder: Path, cls=ZImagePipeline, **arguments) -> np.ndarray:
    pipe = cls.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        prompt=JOB["prompt"],
        height=256,
        width=256,
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        output_type="np",
        **arguments,
    ).images
    return (images[0] * 255).round().astype(int)


def test_the_text_encoder_tokenizer_and_vae_are_shared_and_the_transformers_are_not(both):
    turbo, base = (both.models[name].generator.text_to_image for name in ("z-image-turbo", "z-image"))
    assert (
        turbo.text_encoder is base.text_encoder
        and turbo.vae is base.vae
        and turbo.tokenizer is base.tokenizer
    )
    for module in ("text_encoder", "vae"):
        ptrs = {p.data_ptr() for p in getattr(turbo, module).parameters()}
        assert ptrs == {p.data_ptr() for p in getattr(base, module).parameters()}
    assert not {p.data_ptr() for p in turbo.transformer.parameters()} & {
        p.data_ptr() for p in base.transformer.parameters()
    }
    # One prompt-embedding cache for both.
    assert both.models["z-image"].generator.prompts is both.models["z-image-turbo"].generator.prompts


def test_other_files_are_not_shared(tiny_model, base_model, tmp_path):
    assert same_files(tiny_model / "vae", base_model / "vae")
    assert not same_files(tiny_model / "transformer", base_model / "transformer")
    other = tmp_path / "other"
    shutil.copytree(base_model, other)
    shutil.rmtree(other / "vae")
    tiny_pipeline(seed=9).vae.save_pretrained(other / "vae", safe_serialization=True)
    worker = Worker.start(Settings(model=str(tiny_model), base_model=str(other), safety_checker_model="none"))
    turbo, base = (worker.models[name].generator.text_to_image for name in ("z-image-turbo", "z-image"))
    assert turbo.text_encoder is base.text_encoder and turbo.vae is not base.vae


def test_the_base_model_with_its_defaults_equals_diffusers(both, base_model):
    steps: list[int] = []
    output = run_input(
        both, "base", {**JOB, "model": "z-image", "negative_prompt": "blurry"}, lambda d, t: steps.append(t)
    )
    assert output["model"] == "z-image" and output["cost"] == 0.01
    assert set(steps) == {50}  # the base's default steps, with its default guidance 4.0
    expected = diffusers_pixels(
        base_model, num_inference_steps=50, guidance_scale=4.0, negative_prompt="blurry"
    )
    assert np.abs(pixels(output) - expected).max() <= 2


def test_turbo_beside_it_is_unchanged(both, tiny_model, worker):
    output = handle_job(both, {"id": "turbo", "input": JOB})
    assert output["model"] == "z-image-turbo" and output["cost"] == 0.005
    assert np.array_equal(pixels(output), pixels(handle_job(worker, {"id": "alone", "input": JOB})))
    assert (
        np.abs(pixels(output) - diffusers_pixels(tiny_model, num_inference_steps=8, guidance_scale=0.0)).max()
        <= 2
    )


def test_image_to_image_on_the_base_equals_diffusers(both, base_model):
    source = png_bytes((300, 200), (30, 160, 90))
    fields = {
        **JOB,
        "model": "z-image",
        "image": data_uri_of(source),
        "strength": 0.6,
        "num_inference_steps": 6,
    }
    output = handle_job(both, {"id": "i2i", "input": fields})
    import io

    from PIL import Image

    fitted = cover_crop(Image.open(io.BytesIO(source)).convert("RGB"), 256, 256)
    expected = diffusers_pixels(
        base_model,
        ZImageImg2ImgPipeline,
        image=fitted,
        strength=0.6,
        num_inference_steps=6,
        guidance_scale=4.0,
    )
    assert np.abs(pixels(output) - expected).max() <= 2


def test_per_model_defaults_and_limits():
    turbo, base = parse_request({"prompt": "a"}), parse_request({"prompt": "a", "model": "z-image"})
    assert (turbo.model, turbo.num_inference_steps, turbo.guidance_scale) == ("z-image-turbo", 8, 0.0)
    assert (base.num_inference_steps, base.guidance_scale) == (50, 4.0)
    assert (
        parse_request({"prompt": "a", "model": "z-image", "num_inference_steps": 100}).num_inference_steps
        == 100
    )
    assert parse_request({"prompt": "a", "model": "z-image", "guidance_scale": 0.0}).guidance_scale == 0.0


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"model": "flux"}, "model: 'flux' is not allowed: it must be one of z-image-turbo, z-image"),
        ({"model": ["z-image"]}, "model: a list is not allowed"),
        ({"model": None}, "model: null is not allowed"),
        (
            {"num_inference_steps": 51},
            "num_inference_steps: 51 is not allowed: it must be an integer from 1 to 50 for z-image-turbo "
            "(up to 100 for z-image)",
        ),
        ({"model": "z-image", "num_inference_steps": 101}, "num_inference_steps: 101 is not allowed"),
        ({"modle": "z-image"}, "modle: unknown field; did you mean 'model'?"),
    ],
)
def test_model_errors_name_the_field(worker, fields, says):
    output = handle_job(worker, {"id": "bad", "input": {"prompt": "a", **fields}})
    assert set(output) == {"error"} and output["error"].startswith(says), output


def test_a_model_this_worker_did_not_load_is_named(worker):
    output = handle_job(worker, {"id": "no-base", "input": {**JOB, "model": "z-image"}})
    assert output == {
        "error": "model: 'z-image' is not served by this worker (started without ZIMAGE_BASE_MODEL): "
        "it serves 'z-image-turbo'"
    }


def test_a_base_only_worker(base_model, both):
    alone = Worker.start(Settings(model="none", base_model=str(base_model), safety_checker_model="none"))
    assert list(alone.models) == ["z-image"]
    fields = {**JOB, "model": "z-image", "num_inference_steps": 3}
    assert np.array_equal(
        pixels(handle_job(alone, {"id": "a", "input": fields})),
        pixels(handle_job(both, {"id": "b", "input": fields})),
    )
    assert handle_job(alone, {"id": "t", "input": JOB})["error"].startswith(
        "model: 'z-image-turbo' is not served"
    )


def test_settings_for_the_base_model():
    settings = Settings.from_env({"ZIMAGE_BASE_MODEL": "/models/Z-Image", "BASE_PRICE_PER_IMAGE_USD": "0.02"})
    assert settings.base_model == "/models/Z-Image" and settings.base_price_per_image_usd == 0.02
    assert (
        Settings.from_env({}).base_model == "none" and Settings.from_env({}).base_price_per_image_usd == 0.01
    )
    with pytest.raises(SettingsError, match="ZIMAGE_MODEL and ZIMAGE_BASE_MODEL are both 'none'"):
        Settings.from_env({"ZIMAGE_MODEL": "none"})
    with pytest.raises(SettingsError, match="BASE_PRICE_PER_IMAGE_USD"):
        Settings.from_env({"BASE_PRICE_PER_IMAGE_USD": "cheap"})


def test_control_on_the_base_equals_diffusers_and_shares_the_controlnet(tiny_model, base_model, tmp_path):
    from diffusers import ZImageControlNetPipeline

    from src.control.preprocess import load_control
    from tests.test_control import CONTROL, diffusers_pipeline
    from tests.tiny_controlnets import save_controlnet

    folder, single_file = save_controlnet(tiny_model, "2.1", tmp_path / "controlnet")
    settings = Settings(
        model=str(tiny_model),
        base_model=str(base_model),
        safety_checker_model="none",
        controlnet_model=str(single_file),
        depth_model="none",
    )
    worker = Worker.start(settings)
    fields = {**JOB, "control_image": CONTROL, "num_inference_steps": 3}
    controlnets = {
        name: served.generator.pipelines["text-to-image with control"].controlnet
        for name, served in worker.models.items()
    }
    turbo_net, base_net = controlnets["z-image-turbo"], controlnets["z-image"]
    # One copy of the control weights; each view runs its own model's embedders.
    assert {p.data_ptr() for p in turbo_net.control_layers.parameters()} == {
        p.data_ptr() for p in base_net.control_layers.parameters()
    }
    assert (
        turbo_net.t_embedder is worker.models["z-image-turbo"].generator.text_to_image.transformer.t_embedder
    )
    assert base_net.t_embedder is worker.models["z-image"].generator.text_to_image.transformer.t_embedder
    control = load_control(parse_request(fields))
    for name, model_folder, guidance in (("z-image", base_model, 4.0), ("z-image-turbo", tiny_model, 0.0)):
        output = handle_job(worker, {"id": name, "input": {**fields, "model": name}})
        pipe = diffusers_pipeline(ZImageControlNetPipeline, model_folder, folder)
        expected = pipe(
            prompt=JOB["prompt"],
            control_image=control,
            controlnet_conditioning_scale=0.75,
            height=256,
            width=256,
            num_inference_steps=3,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(JOB["seed"])],
            output_type="np",
        ).images[0]
        assert np.abs(pixels(output) - np.round(expected * 255)).max() <= 2, name
