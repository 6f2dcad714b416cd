"""LoRAs on the tiny model: the worker's pixels equal diffusers' own LoRA loading, in every key layout."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline
from PIL import Image

from src.inputs.pictures import cover_crop
from src.jobs.worker import Worker
from src.runtime.settings import Settings
from tests.conftest import data_uri_of, decode_data_uri, handle_job, png_bytes
from tests.tiny_loras import LAYOUTS, make_lora, save_lora

BASE = {"prompt": "a red fox in snow", "size": "256*256", "seed": 11, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """one.safetensors in each layout (same weights), and two more LoRAs in mixed layouts."""
    folder = tmp_path_factory.mktemp("loras")
    state, config = make_lora(tiny_model, seed=1)
    for layout in LAYOUTS:
        save_lora(state, config, folder / f"one-{layout}.safetensors", layout)
    save_lora(*make_lora(tiny_model, seed=2, rank=2, alpha=2.0), folder / "two.safetensors", "kohya")
    save_lora(*make_lora(tiny_model, seed=3, rank=8), folder / "three.safetensors", "comfyui")
    return folder


@pytest.fixture(scope="module")
def lora_worker(tiny_model: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        lora_dirs=(str(lora_dir),),
        lora_cache_dir=str(tmp_path_factory.mktemp("lora-cache")),
        lora_max_loaded=2,
    )
    return Worker.start(settings)


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "lora-test", "input": {**BASE, **fields}})
    assert "error" not in output, output
    return output


def pixels(output: dict) -> np.ndarray:
    return np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(int)


def diffusers_reference(
    model: Path, loras: list[tuple[Path, float]], image: Image.Image | None = None, **extra
):
    """diffusers alone: load_lora_weights + set_adapters + the plain pipeline call, same seed."""
    cls = ZImagePipeline if image is None else ZImageImg2ImgPipeline
    pipe = cls.from_pretrained(model, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"adapter{i}")
    pipe.set_adapters([f"adapter{i}" for i in range(len(loras))], [scale for _, scale in loras])
    if image is not None:
        extra.update(image=image)
    result = pipe(
        prompt=BASE["prompt"],
        height=256,
        width=256,
        num_inference_steps=BASE["num_inference_steps"],
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(BASE["seed"]),
        output_type="np",
        **extra,
    )
    return (result.images[0] * 255).round().astype(int)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_key_layout_gives_diffusers_pixels(lora_worker, lora_dir, tiny_model, worker, layout):
    name = f"one-{layout}.safetensors"
    output = run(lora_worker, loras=[{"path": name, "scale": 0.8}])
    ours = pixels(output)
    # diffusers' own load of the diffusers-layout file is the reference for all three.
    reference = diffusers_reference(tiny_model, [(lora_dir / "one-diffusers.safetensors", 0.8)])
    assert np.abs(ours - reference).max() <= 2
    assert np.abs(ours - pixels(run(worker))).max() > 20  # the LoRA really changed the picture
    assert output["timings"]["load_loras"] > 0


def test_three_adapters_at_mixed_scales(lora_worker, lora_dir, tiny_model):
    loras = [("one-kohya.safetensors", 1.0), ("two.safetensors", -0.7), ("three.safetensors", 0.5)]
    output = run(lora_worker, loras=[{"path": path, "scale": scale} for path, scale in loras])
    reference = diffusers_reference(tiny_model, [(lora_dir / path, scale) for path, scale in loras])
    assert np.abs(pixels(output) - reference).max() <= 2
    # Three in one job may exceed LORA_MAX_LOADED=2 for that job; the loaded set is the transformer's.
    adapters = lora_worker.generator.text_to_image.transformer.peft_config
    assert set(lora_worker.loras.loaded) == set(adapters) and len(adapters) <= 3


def test_scale_zero_gives_the_base_image(lora_worker, worker):
    zero = run(lora_worker, loras=[{"path": "two.safetensors", "scale": 0.0}])
    assert np.abs(pixels(zero) - pixels(run(worker))).max() == 0


def test_image_to_image_with_a_lora(lora_worker, lora_dir, tiny_model):
    source = png_bytes((320, 240), (30, 140, 200))
    output = run(
        lora_worker,
        image=data_uri_of(source),
        strength=0.7,
        loras=[{"path": "three.safetensors", "scale": 1.5}],
    )
    fitted = cover_crop(Image.open(io.BytesIO(source)), 256, 256)
    reference = diffusers_reference(
        tiny_model, [(lora_dir / "three.safetensors", 1.5)], image=fitted, strength=0.7
    )
    assert np.abs(pixels(output) - reference).max() <= 2


def test_a_job_without_loras_runs_the_base_weights_exactly(lora_worker, worker):
    never_loaded = run(worker)  # the session worker never sees a LoRA
    run(lora_worker, loras=[{"path": "one-comfyui.safetensors", "scale": 2.0}])
    after = run(lora_worker)
    assert after["image_url"] == never_loaded["image_url"]
    assert after["timings"]["load_loras"] == 0


def test_least_recently_used_adapters_are_unloaded(lora_worker, lora_dir):
    for name in ("one-diffusers.safetensors", "two.safetensors", "three.safetensors", "two.safetensors"):
        run(lora_worker, loras=[{"path": name}], num_inference_steps=1)
    adapters = lora_worker.generator.text_to_image.transformer.peft_config
    assert len(adapters) == 2 == len(lora_worker.loras.loaded)
    # Adapters are named by the file's sha256: the two used last stay.
    expected = {f"lora_{sha256(lora_dir / name)[:16]}" for name in ("three.safetensors", "two.safetensors")}
    assert set(adapters) == expected


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_jobs_in_flight_together_each_get_their_own_adapters(lora_worker):
    """LoRA and plain jobs in flight together: each activates its own state on the GPU thread."""
    jobs = [
        {**BASE, "loras": [{"path": "two.safetensors", "scale": 1.2}]},
        dict(BASE),
        {**BASE, "loras": [{"path": "three.safetensors", "scale": -0.5}]},
        dict(BASE),
    ]
    alone = [run(lora_worker, **job)["image_url"] for job in jobs]

    async def together() -> list[dict]:
        return await asyncio.gather(
            *(lora_worker.handle({"id": f"c{i}", "input": job}) for i, job in enumerate(jobs))
        )

    assert [output["image_url"] for output in asyncio.run(together())] == alone
