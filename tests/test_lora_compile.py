"""ZIMAGE_COMPILE=1 with LoRAs: switching adapters reuses the compiled graphs (dynamo's own counters).

The worker compiles on CUDA only; here the tiny transformer is compiled on the CPU with
inductor, the same way `accelerate` does (regional, fullgraph, dynamic shapes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from src.jobs.worker import Worker
from src.lora.adapters import LoraAdapters
from src.runtime.settings import Settings
from tests.conftest import decode_data_uri, handle_job
from tests.test_loras import BASE, diffusers_reference
from tests.tiny_loras import make_lora, save_lora


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    save_lora(*make_lora(tiny_model, seed=21), folder / "a.safetensors", "kohya")
    save_lora(*make_lora(tiny_model, seed=22, rank=8), folder / "b.safetensors", "diffusers")
    save_lora(*make_lora(tiny_model, seed=23, rank=2), folder / "c.safetensors", "comfyui")
    return folder


def start_compiled(tiny_model: Path, lora_dir: Path, cache: Path) -> Worker:
    """What Worker.start does on CUDA with ZIMAGE_COMPILE=1, up to its warm-up: slots, then the compile."""
    # Graphs compiled for another worker in this process would be reused and hide this one's compiles.
    torch._dynamo.reset()
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        lora_dirs=(str(lora_dir),),
        lora_cache_dir=str(cache),
    )
    worker = Worker.start(settings)
    worker.models["z-image-turbo"].loras = LoraAdapters(
        worker.generator.text_to_image, worker.loras.files, 6, hotswap=True
    )
    worker.generator.text_to_image.transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
    return worker


def run(worker: Worker, loras: list) -> tuple[np.ndarray, int]:
    """The image, and how many graphs dynamo compiled for it."""
    before = counters["stats"]["unique_graphs"]
    output = handle_job(worker, {"id": "compiled", "input": {**BASE, "loras": loras}})
    assert "error" not in output, output
    pixels = np.asarray(decode_data_uri(output["image_url"]).convert("RGB")).astype(int)
    return pixels, counters["stats"]["unique_graphs"] - before


def test_the_warm_up_compiles_the_lora_graph_so_no_lora_job_compiles_and_each_matches_diffusers(
    tiny_model, lora_dir, tmp_path
):
    # One compiled worker for both checks: its compile (inductor's C++ build) is most of the time.
    worker = start_compiled(tiny_model, lora_dir, tmp_path)
    before = counters["stats"]["unique_graphs"]
    # Worker.start's own call on CUDA with ZIMAGE_COMPILE=1: every preset size, with the slots.
    worker.generator.warm_up(compiled=True, lora_slots=worker.loras.slots)
    assert counters["stats"]["unique_graphs"] > before
    base, compiled = run(worker, [])
    assert compiled == 0
    # Switching adapters, their number and their scales, compiles nothing and gives diffusers' pixels.
    mixed = [("a.safetensors", 1.0), ("b.safetensors", -0.6), ("c.safetensors", 2.0)]
    jobs = [
        [{"path": "a.safetensors"}],
        [{"path": "b.safetensors", "scale": -0.5}],
        [{"path": path, "scale": scale} for path, scale in mixed],
        [{"path": "c.safetensors"}],
        [{"path": "a.safetensors", "scale": 0.25}],
    ]
    images = []
    for loras in jobs:
        image, compiled = run(worker, loras)
        assert compiled == 0, loras
        images.append(image)
    reference = diffusers_reference(tiny_model, [(lora_dir / path, scale) for path, scale in mixed])
    assert np.abs(images[2] - reference).max() <= 2
    again, compiled = run(worker, [])
    assert compiled == 0 and np.array_equal(again, base)  # the warm-up left the base weights on
