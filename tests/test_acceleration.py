"""Acceleration levels (`acceleration`): per job, on every mode and both models, with no leakage.

One worker serves Turbo and the base-shaped tiny model, a 2.1 ControlNet and a LoRA folder. A
level's work is counted where it happens: a forward pre-hook on a module inside a main block (and
inside a ControlNet block) fires only when that block really runs, so a job's count is the number
of steps its transformer computed rather than forecast.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline

from src.jobs.worker import Worker
from src.model import acceleration
from src.model.acceleration import LEVELS, steps_computed, steps_run
from src.model.pipeline import ZImageGenerator
from src.request.models import MODELS
from src.request.schema import ACCELERATION_LEVELS, GenerateRequest
from src.runtime.settings import Settings
from tests.conftest import decode_data_uri, handle_job
from tests.test_control import CONTROL
from tests.test_inpaint import IMAGE, MASK
from tests.test_two_models import base_model  # noqa: F401
from tests.tiny_controlnets import save_controlnet
from tests.tiny_loras import make_lora, save_lora

STEPS = 8
JOB = {"prompt": "a lighthouse in fog", "size": "256*256", "seed": 11, "num_inference_steps": STEPS}
# Every mode, with and without a LoRA, on both models (the base's own defaults otherwise).
MODES = {
    "text-to-image": {},
    "image-to-image": {"image": IMAGE, "strength": 0.9},
    "inpainting": {"image": IMAGE, "mask": MASK, "strength": 1.0},
    "text-to-image with control": {"control_image": CONTROL},
    "inpainting with control": {"image": IMAGE, "mask": MASK, "control_image": CONTROL},
    "lora": {"loras": [{"path": "style.safetensors", "scale": 0.8}]},
}


@pytest.fixture(scope="module")
def folders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("acceleration")
    _, single_file = save_controlnet(tiny_model, "2.1", root / "controlnet")
    loras = root / "loras"
    loras.mkdir()
    save_lora(*make_lora(tiny_model, seed=9), loras / "style.safetensors", "kohya")
    return {"controlnet": single_file, "loras": loras}


def start(tiny_model: Path, base: Path, folders: dict[str, Path]) -> Worker:
    return Worker.start(
        Settings(
            model=str(tiny_model),
            base_model=str(base),
            safety_checker_model="none",
            controlnet_model=str(folders["controlnet"]),
            depth_model="none",
            lora_dirs=(str(folders["loras"]),),
        )
    )


@pytest.fixture(scope="module")
def worker(tiny_model: Path, base_model: Path, folders: dict[str, Path]) -> Worker:  # noqa: F811
    return start(tiny_model, base_model, folders)


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "accel", "input": {**JOB, **fields}})
    assert "error" not in output, output
    return output


def pixels(output: dict) -> np.ndarray:
    return np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(float)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@contextmanager
def counting(worker: Worker, model: str) -> Iterator[dict[str, int]]:
    """Calls of a module inside the last main block and inside a ControlNet block, during the block."""
    generator = worker.models[model].generator
    counts = {"transformer": 0, "controlnet": 0}
    watched = {
        "transformer": generator.text_to_image.transformer.layers[-1].attention,
        "controlnet": generator.controlnet.control_layers[0].attention,
    }
    handles = []
    for name, module in watched.items():

        def count(*_, name=name) -> None:
            counts[name] += 1

        handles.append(module.register_forward_pre_hook(count))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def no_hooks_left(worker: Worker) -> bool:
    modules = [
        module
        for served in worker.models.values()
        for net in (served.generator.text_to_image.transformer, served.generator.controlnet)
        for module in net.modules()
    ]
    registries = [getattr(module, "_diffusers_hook", None) for module in modules]
    return all(registry is None or not registry.hooks for registry in registries)


# ------------------------------------------------------------------- the table and the request
def test_every_model_has_every_level_and_none_is_the_plain_pipeline():
    assert set(LEVELS) == set(MODELS)
    for levels in LEVELS.values():
        assert tuple(levels) == ACCELERATION_LEVELS and levels["none"] is None
        regular, high = levels["regular"], levels["high"]
        assert 2 <= regular.interval <= high.interval  # high forecasts at least as many steps
        assert high.warm_up <= regular.warm_up


BAD_LEVELS = ["fast", "", "HIGH", "max", 1, 0.5, True, None, ["high"], {"level": "high"}]


@pytest.mark.parametrize("value", BAD_LEVELS)
def test_a_bad_level_is_an_error_naming_acceleration_and_the_worker_serves_on(worker, value):
    output = handle_job(worker, {"id": "bad", "input": {**JOB, "acceleration": value}})
    assert set(output) == {"error"}, output
    assert output["error"].startswith("acceleration: ") and "none, regular, high" in output["error"]
    assert run(worker)["acceleration"] == "none"


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.55, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("steps", [1, 8, 30, 50])
def test_steps_run_is_the_image_pipelines_own_count(worker, steps, strength):
    pipe = worker.generator.pipelines["image-to-image"]
    assert isinstance(pipe, ZImageImg2ImgPipeline)
    pipe.scheduler.set_timesteps(steps)
    timesteps, count = pipe.get_timesteps(steps, strength, "cpu")
    assert steps_run(steps, strength) == count == len(timesteps)
    assert steps_run(steps, None) == steps


# ------------------------------------------------------------------- what each level does
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", list(MODES))
def test_each_level_forecasts_its_steps_in_every_mode_and_model(worker, model, mode):
    fields = {**MODES[mode], "model": model}
    # Image-to-image and inpainting run the last `strength` of the steps; with control, all of them.
    strength = fields.get("strength") if "control_image" not in fields else None
    steps = steps_run(STEPS, strength)
    images = {}
    for level in ACCELERATION_LEVELS:
        with counting(worker, model) as counts:
            output = run(worker, **fields, acceleration=level)
        assert output["acceleration"] == level and output["model"] == model
        expected = steps_computed(LEVELS[model][level], steps)
        assert counts["transformer"] == expected, (level, counts)
        # With control, the ControlNet's blocks are forecast with the transformer's.
        assert counts["controlnet"] == (expected if "control_image" in fields else 0), (level, counts)
        images[level] = pixels(output)
    assert steps_computed(LEVELS[model]["high"], steps) < steps
    for level in ("regular", "high"):
        # Approximately the same picture: close, not equal.
        assert 0 < np.abs(images[level] - images["none"]).mean() < 40, level
    assert no_hooks_left(worker)


def test_none_is_the_request_without_the_field_and_a_fresh_workers_bytes(tiny_model, base_model, folders):  # noqa: F811
    fresh = start(tiny_model, base_model, folders)
    expected = {model: run(fresh, model=model)["image_url"] for model in MODELS}
    used = start(tiny_model, base_model, folders)
    for model in MODELS:
        for level in ("high", "regular", "high"):
            run(used, model=model, acceleration=level, **MODES["text-to-image with control"])
            run(used, model=model, acceleration=level)
        assert run(used, model=model, acceleration="none")["image_url"] == expected[model]
        assert run(used, model=model)["image_url"] == expected[model]
    assert no_hooks_left(used)


def test_a_level_gives_the_same_bytes_every_time(worker):
    first = run(worker, acceleration="high")["image_url"]
    run(worker, acceleration="regular", model="z-image")
    assert run(worker, acceleration="high")["image_url"] == first


def test_levels_in_flight_together_give_each_ones_bytes_alone(worker):
    mix = [("high", "z-image-turbo"), ("none", "z-image-turbo"), ("regular", "z-image"), ("high", "z-image")]
    jobs = [{**JOB, "acceleration": a, "model": model, "seed": 30 + i} for i, (a, model) in enumerate(mix)]
    alone = [run(worker, **job)["image_url"] for job in jobs]

    async def together() -> list[dict]:
        handled = (worker.handle({"id": f"c{i}", "input": job}) for i, job in enumerate(jobs))
        return await asyncio.gather(*handled)

    outputs = asyncio.run(together())
    assert [output["image_url"] for output in outputs] == alone
    assert [output["acceleration"] for output in outputs] == [job["acceleration"] for job in jobs]


# ------------------------------------------------------------------- a compiled worker
def test_a_compiled_worker_refuses_the_levels_naming_acceleration(tiny_model, monkeypatch, caplog):
    """ZIMAGE_COMPILE=1 compiles on CUDA only; here `accelerate` compiles the blocks on the CPU
    (dynamo with its eager backend: the same wrapping, no kernels), as the CUDA path does."""

    def compile_blocks(self: ZImageGenerator, precision: str, compile_blocks: bool) -> None:
        assert compile_blocks
        self.text_to_image.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True, backend="eager")

    torch._dynamo.reset()
    monkeypatch.setattr(ZImageGenerator, "accelerate", compile_blocks)
    caplog.set_level(logging.WARNING)
    compiled = Worker.start(Settings(model=str(tiny_model), safety_checker_model="none", compile=True))
    assert compiled.generator.compiled
    assert any("'regular' and 'high' are refused" in record.getMessage() for record in caplog.records)
    for level in ("regular", "high"):
        output = handle_job(compiled, {"id": "compiled", "input": {**JOB, "acceleration": level}})
        assert set(output) == {"error"}, output
        assert output["error"].startswith(f"acceleration: '{level}' is not available on this worker")
        assert "ZIMAGE_COMPILE" in output["error"]
    assert run(compiled, acceleration="none")["acceleration"] == "none"
    torch._dynamo.reset()


def test_the_plain_worker_is_not_compiled(worker):
    assert not any(served.generator.compiled for served in worker.models.values())
    request = GenerateRequest(prompt="x", acceleration="high")
    assert acceleration.refusal(request.acceleration, compiled=False) is None
    assert acceleration.refusal("none", compiled=True) is None
