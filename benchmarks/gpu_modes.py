"""The modes added after text-to-image (inpainting, LoRAs, control), found from the request model.

Each one's row turns on when its field lands in `GenerateRequest`; until then it is a named
skip. Kept apart from gpu_sections.py so that adding a mode touches only this table.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import ZImageControlNetModel
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from src.control.configs import release_config
from src.jobs.worker import Worker
from src.model.pipeline import ZImageGenerator
from src.request.schema import GenerateRequest
from src.runtime.settings import Settings

# Run on the worker before the mode's jobs; what it returns goes into the mode's row.
Prepare = Callable[[Worker], dict[str, Any]]

LORA_FILE = "bench-lora.safetensors"
LORA_RANK = 32


def has_field(name: str) -> bool:
    return name in GenerateRequest.model_fields


def lora_folder(folder: Path, model: Path) -> Path:
    """A random rank-32 LoRA on every attention projection, in diffusers' PEFT key layout."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LORA_FILE
    if has_field("loras") and not path.exists():
        config = json.loads((model / "transformer" / "config.json").read_text())
        dim, generator = config["dim"], torch.Generator().manual_seed(0)
        tensors = {}
        for i in range(config["n_layers"]):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                key = f"transformer.layers.{i}.attention.{proj}"
                down = torch.randn(LORA_RANK, dim, generator=generator) / dim**0.5
                tensors[f"{key}.lora_A.weight"] = down.to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (
                    torch.randn(dim, LORA_RANK, generator=generator) * 1e-3
                ).to(torch.bfloat16)
        save_file(tensors, path)
    return folder


def lora_settings(folder: Path) -> dict[str, Any]:
    """LORA_DIRS for a worker built with Settings(...), in whatever type the field has once it lands."""
    field = Settings.__dataclass_fields__.get("lora_dirs")
    if field is None:
        return {}
    return {"lora_dirs": (str(folder),) if isinstance(field.default, tuple | list) else str(folder)}


def centre_mask(width: int, height: int) -> str:
    """White (regenerate) in the middle third, black (keep) around it, as a PNG data URI."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 3, height // 3, 2 * width // 3, 2 * height // 3), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def random_controlnet(worker: Worker) -> dict[str, Any]:
    """Give the worker a random 2.1 ControlNet of the real size, built on its device.

    The 2.1 release's config on the worker's transformer (src/control/configs.py; 3.36B
    parameters on the full-size model), torch's default random init straight in the worker's
    dtype and on its device: no 6.7 GB file to write and read, and no float32 copy. (diffusers
    zero-initialises the projections that feed the hints in: the same matmuls, so the same time.)
    The generator is rebuilt around it as Worker.start builds it, and accelerated the same way.
    """
    generator = worker.generator
    transformer = generator.text_to_image.transformer
    start = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(transformer.dtype)
    try:
        with torch.device(generator.device):
            controlnet = ZImageControlNetModel(**release_config("2.1", transformer.config)).eval()
    finally:
        torch.set_default_dtype(previous)
    if generator.device.type == "cuda":
        torch.cuda.synchronize()
    built_s = time.perf_counter() - start
    params = sum(p.numel() for p in controlnet.parameters())  # before it takes the shared modules
    worker.models["z-image-turbo"].generator = ZImageGenerator(
        generator.text_to_image, generator.device, controlnet
    )
    worker.generator.accelerate(worker.settings.acceleration, compile_blocks=False)
    return {"controlnet": "2.1, random", "params": params, "build_s": round(built_s, 1)}


def newer_modes(
    image: str, width: int, height: int
) -> list[tuple[str, dict[str, Any], str | None, Prepare | None]]:
    """(mode, what the job adds, why it is skipped or None, what to do first) for each newer mode."""
    missing = "not in this version: the request model has no `{}` field"
    return [
        (
            "inpainting",
            {"image": image, "mask": centre_mask(width, height), "strength": 1.0},
            None if has_field("mask") else missing.format("mask"),
            None,
        ),
        (
            "lora activation",
            {"loras": [{"path": LORA_FILE, "scale": 1.0}]},
            None if has_field("loras") else missing.format("loras"),
            None,
        ),
        (
            # Text-to-image with control; the picture is the control map as sent (no preprocessing).
            "control",
            {"control_image": image},
            None if has_field("control_image") else missing.format("control_image"),
            random_controlnet,
        ),
    ]
