"""Memory plans on the tiny models (API.md, "GPU memory: a plan for the card").

One worker per plan, each serving both models, a 2.1 ControlNet, a Tile ControlNet and a LoRA
folder: every plan is
forced by name and runs every kind of job; `auto` reaches each plan from a budget just above that
plan's need (src/model/memory.py), measured on these same models.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builder.tiny_model import build_tiny_base
from src.jobs.worker import Worker
from src.model import memory
from src.model.memory import GB, PLANS, TABLE, Job, MemoryRefusal
from src.model.placement import KEPT, STORAGE, castable, worst_job
from src.request.parse import parse_request
from src.runtime.settings import MEMORY_PLANS, Settings, SettingsError
from tests.conftest import ROOT, data_uri_of, decode_data_uri, handle_job, png_bytes
from tests.tiny_controlnets import save_controlnet, save_tile_controlnet
from tests.tiny_loras import make_lora, save_lora

JOB = {"prompt": "a lighthouse at dusk", "size": "256*256", "seed": 21, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def folders(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    loras = root / "loras"
    save_lora(*make_lora(tiny_model, seed=7), loras / "style.safetensors", "kohya")
    return {
        "base": build_tiny_base(tiny_model, root / "base"),
        "controlnet": save_controlnet(tiny_model, "2.1", root / "controlnet")[1],
        "tile": save_tile_controlnet(tiny_model, root / "tile"),
        "loras": loras,
    }


def settings(tiny_model: Path, folders: dict[str, Path], **extra) -> Settings:
    return Settings(
        model=str(tiny_model),
        base_model=str(folders["base"]),
        controlnet_model=str(folders["controlnet"]),
        tile_controlnet_model=str(folders["tile"]),
        depth_model="none",
        safety_checker_model="none",
        lora_dirs=(str(folders["loras"]),),
        **extra,
    )


@pytest.fixture(scope="module")
def workers(tiny_model: Path, folders: dict[str, Path]) -> dict[str, Worker]:
    """One worker per plan, forced by name (no budget: each plan as it is)."""
    return {plan: Worker.start(settings(tiny_model, folders, memory_plan=plan)) for plan in PLANS}


def run(worker: Worker, **fields) -> list[np.ndarray]:
    output = handle_job(worker, {"id": "memory-test", "input": {**JOB, **fields}})
    assert "error" not in output, output
    uris = [image["image_url"] for image in output.get("images", [output])]
    return [np.asarray(decode_data_uri(uri).convert("RGB")).astype(int) for uri in uris]


def kinds() -> dict[str, dict]:
    """Every kind of job: text-to-image, image-to-image, inpainting, control, a LoRA, the base model."""
    picture = data_uri_of(png_bytes((256, 256), (40, 120, 200)))
    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[:, 128:] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return {
        "text-to-image": {"num_images": 2},
        "image-to-image": {"image": picture, "strength": 0.6},
        "inpainting": {"image": picture, "mask": data_uri_of(buffer.getvalue())},
        "control": {"control_image": picture},
        "lora": {"loras": [{"path": "style.safetensors", "scale": 1.0}]},
        "base model": {"model": "z-image", "num_inference_steps": 2, "guidance_scale": 3.0},
        "upscale": {"image": picture, "upscale": {"factor": 2.0}, "size": "auto", "strength": 0.5},
    }


def test_plan_names_are_the_settings_choices():
    assert tuple(TABLE) == PLANS == MEMORY_PLANS


def test_each_plan_needs_less_than_the_one_before(workers):
    placed = workers["resident"].placement
    needs = [memory.need(TABLE[plan], placed.parts, placed.shapes) for plan in PLANS]
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == len(needs), needs
    # The same estimator on the tiny models: weights of a few MB (a 2048x2048 batch still needs GBs).
    assert placed.parts.total < 50 * 2**20


@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_runs_every_kind_of_job(workers, plan):
    for kind, fields in kinds().items():
        images = run(workers[plan], **fields)
        if plan != "fp8":  # the same arithmetic on the same weights: resident's pixels
            reference = run(workers["resident"], **fields)
            for image, expected in zip(images, reference, strict=True):
                assert np.abs(image - expected).max() <= 2, (plan, kind)


def test_the_log_line_says_the_plan_the_budget_and_where_each_part_lives(workers):
    assert workers["resident"].placement.line.startswith(
        "memory plan: resident for unlimited: transformer on cpu"
    )
    line = workers["fp8"].placement.line
    assert "memory plan: fp8 for unlimited:" in line
    assert "stored in fp8" in line and "text encoder and expander" not in line
    assert "text encoder in CPU memory between uses" in line


def test_offload_brings_the_text_encoder_over_for_each_new_prompt_and_back(workers):
    worker = workers["offload"]
    residence = worker.generator.prompts.residence
    before = residence.trips
    run(worker, prompt="a prompt not seen before by this worker")
    assert residence.trips == before + 1
    run(worker, prompt="a prompt not seen before by this worker")  # cached: no trip
    assert residence.trips == before + 1
    assert all(p.device.type == "cpu" for p in worker.generator.text_encoder.parameters())
    assert workers["resident"].generator.prompts.residence.trips == 0


def test_fp8_stores_float8_except_norms_embedders_and_the_final_layer(workers):
    generator = workers["fp8"].generator
    for model in (generator.text_to_image.transformer, generator.controlnet):
        cast = {name for name, _ in castable(model)}
        assert cast, model
        for name, layer in model.named_modules():
            if not isinstance(layer, torch.nn.Linear) or ".lora_" in name:
                continue  # adapters of an earlier LoRA job stay in the compute dtype
            kept = any(word in name for word in KEPT)
            assert (layer.weight.dtype == STORAGE) != kept, name
            assert (name in cast) != kept, name
    transformer = generator.text_to_image.transformer
    assert transformer.all_final_layer["2-1"].linear.weight.dtype == torch.float32
    assert transformer.cap_embedder[1].weight.dtype == torch.float32
    assert transformer.layers[0].attention.to_q.weight.dtype == STORAGE


def budget_for(workers, plan: str) -> float:
    placed = workers["resident"].placement
    return memory.need(TABLE[plan], placed.parts, placed.shapes, memory_job(workers))


def memory_job(workers) -> Job:
    return worst_job(workers["resident"].settings.lora_max_loaded)


@pytest.mark.parametrize("plan", PLANS)
def test_auto_picks_the_first_plan_that_fits(workers, plan):
    placed = workers["resident"].placement
    job = memory_job(workers)
    # With the fewest LoRA slots: with more, an earlier plan with fewer slots may fit the budget.
    budget = memory.need(TABLE[plan], placed.parts, placed.shapes, replace(job, loras=memory.MIN_LORA_SLOTS))
    assert memory.choose("auto", placed.parts, placed.shapes, budget, job=job).plan.name == plan
    assert memory.choose("auto", placed.parts, placed.shapes, budget + 1, job=job).plan.name == plan
    forced = memory.choose("resident", placed.parts, placed.shapes, budget, job=job)
    assert forced.fits == (plan == "resident")


def test_below_fp8s_need_the_worker_refuses_to_start(tiny_model, folders, workers):
    placed = workers["resident"].placement
    fewest = replace(memory_job(workers), loras=memory.MIN_LORA_SLOTS)  # the slots it may drop to
    need = memory.need(TABLE["fp8"], placed.parts, placed.shapes, fewest)
    too_little = (need - 1) / GB
    with pytest.raises(MemoryRefusal) as refused:
        Worker.start(settings(tiny_model, folders, gpu_memory_gb=too_little))
    message = str(refused.value)
    assert message.startswith("GPU_MEMORY_GB:") and "GB" in message
    assert f"{(need) / GB:.3g} GB" in message
    assert "CONTROLNET_MODEL=none" in message and "TILE_CONTROLNET_MODEL=none" in message


def test_lora_slots_are_part_of_the_plan(workers):
    """`auto` keeps LORA_MAX_LOADED slots where they fit, and fewer (never below 3) where that lets
    an earlier plan fit; the log line and the adapters follow."""
    placed = workers["resident"].placement
    job = memory_job(workers)
    assert job.loras == 6 and placed.choice.lora_slots == 6 and placed.line.endswith("6 LoRA slots")
    # A budget between resident's need with 3 slots and with 6: resident, with the slots that fit.
    with_three = memory.need(TABLE["resident"], placed.parts, placed.shapes, replace(job, loras=3))
    with_four = memory.need(TABLE["resident"], placed.parts, placed.shapes, replace(job, loras=4))
    assert with_three < with_four
    choice = memory.choose("auto", placed.parts, placed.shapes, with_four, job=job)
    assert (choice.plan.name, choice.lora_slots, choice.fits) == ("resident", 4, True)
    choice = memory.choose("auto", placed.parts, placed.shapes, with_three, job=job)
    assert (choice.plan.name, choice.lora_slots) == ("resident", 3)
    # Below resident's need with 3 slots, the next plan, with as many slots as fit it.
    choice = memory.choose("auto", placed.parts, placed.shapes, with_three - 1, job=job)
    assert choice.plan.name == "sliced" and choice.lora_slots == 6


def test_the_worker_keeps_the_slots_its_plan_names(tiny_model, folders, workers):
    placed = workers["resident"].placement
    job = memory_job(workers)
    budget = memory.need(TABLE["resident"], placed.parts, placed.shapes, replace(job, loras=4))
    worker = Worker.start(settings(tiny_model, folders, gpu_memory_gb=budget / GB))
    assert worker.placement.choice.plan.name == "resident" and worker.placement.choice.lora_slots == 4
    assert worker.placement.line.endswith(", 4 LoRA slots")
    assert all(served.loras.max_loaded == 4 for served in worker.models.values())


def test_the_estimate_counts_the_tile_controlnet_and_an_upscale(workers):
    placed = workers["resident"].placement
    assert placed.parts.tile_controlnet > 0 and placed.shapes.tile_hints > 0
    assert "Tile ControlNet on cpu" in placed.line
    plan, big_tiles = TABLE["sliced"], replace(memory_job(workers), tile=2048)
    upscale = memory.upscale_bytes(placed.shapes, big_tiles, plan, tile_control=True)
    plain = memory.upscale_bytes(placed.shapes, big_tiles, plan, tile_control=False)
    # The canvas at 4096x4096 alone: latents and pixels in and out; a tile's hints on top.
    assert upscale > plain > 3 * 4096 * 4096 * 4 * 2
    assert memory.upscale_bytes(placed.shapes, replace(memory_job(workers), upscale=False), plan, True) == 0


@pytest.fixture(scope="module")
def split_worker(tiny_model: Path, folders: dict[str, Path]) -> Worker:
    """`sliced` forced on a budget below its need: every batch is split down to single images."""
    return Worker.start(settings(tiny_model, folders, memory_plan="sliced", gpu_memory_gb=0.001))


def test_a_forced_plan_that_does_not_fit_says_so_and_splits_every_batch(split_worker):
    placed = split_worker.placement
    assert placed.choice.plan.name == "sliced" and not placed.choice.fits
    assert "memory plan: sliced for 0.001 GB:" in placed.line and "does not fit" in placed.line
    request = parse_request({**JOB, "num_images": 4})
    assert split_worker.generator.largest_batch(request) == 1


@pytest.mark.parametrize("batch", [1, 3])
def test_image_i_of_a_split_batch_is_the_single_job_with_seed_plus_i(split_worker, workers, batch):
    generator = split_worker.generator
    planned = generator.largest_batch
    generator.largest_batch = lambda request: batch  # 1: the plan's own split; 3: split 3 + 1
    try:
        images = run(split_worker, size="512*512", num_images=4)
    finally:
        generator.largest_batch = planned
    whole = run(workers["resident"], size="512*512", num_images=4)
    for i, image in enumerate(images):
        single = run(workers["resident"], size="512*512", seed=JOB["seed"] + i)[0]
        assert np.abs(image - single).max() <= 2, i
        assert np.abs(image - whole[i]).max() <= 2, i


def test_four_images_at_2048_complete_one_at_a_time(split_worker):
    fields = {"size": "2048*2048", "num_images": 4, "num_inference_steps": 1, "output_format": "jpeg"}
    output = handle_job(split_worker, {"id": "big", "input": {**JOB, **fields, "output_quality": 30}})
    assert "error" not in output, output
    assert len(output["images"]) == 4


def test_settings_reject_bad_values():
    for env, name in (({"GPU_MEMORY_GB": "0"}, "GPU_MEMORY_GB"), ({"MEMORY_PLAN": "all"}, "MEMORY_PLAN")):
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)
    assert Settings.from_env({"GPU_MEMORY_GB": "24", "MEMORY_PLAN": "FP8"}).memory_plan == "fp8"
    assert Settings.from_env({}).gpu_memory_gb is None


def test_the_plans_import_no_package_and_handler_no_torchao():
    """`import handler` with ZIMAGE_PRECISION unset: the plans' modules add nothing beyond
    themselves to what the floor and the modules before them import, and torchao stays out."""
    floor = "import torch; from diffusers import ZImagePipeline; from transformers import Qwen3Model"
    code = (
        f"import sys; {floor}; import src.model.acceleration, src.request.schema, src.runtime.settings; "
        "before = set(sys.modules); "
        "import src.model.memory, src.model.placement, src.model.residence; "
        "print(sorted(set(sys.modules) - before)); "
        "import handler; print('torchao' in sys.modules, '/opt/fp8' in sys.path)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ZIMAGE_PRECISION", "ZIMAGE_ACCELERATION")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    added, fp8 = done.stdout.strip().splitlines()[-2:]
    assert added == str(["src.model.memory", "src.model.placement", "src.model.residence"])
    assert fp8 == "False False"
