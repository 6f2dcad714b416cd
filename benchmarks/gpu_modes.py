"""The modes that are still being added (inpainting, LoRAs, control), found from the request model.

Each one's row turns on when its field lands in `GenerateRequest`; until then it is a named
skip. Kept apart from gpu_sections.py so that adding a mode touches only this table.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from src.request import GenerateRequest
from src.settings import Settings

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


def newer_modes(image: str, width: int, height: int) -> list[tuple[str, dict[str, Any], str | None]]:
    """(mode, what the job adds, why it is skipped or None) for each mode still being added."""
    missing = "not in this version: the request model has no `{}` field"
    return [
        (
            "inpainting",
            {"image": image, "mask": centre_mask(width, height), "strength": 1.0},
            None if has_field("mask") else missing.format("mask"),
        ),
        (
            "lora activation",
            {"loras": [{"path": LORA_FILE, "scale": 1.0}]},
            None if has_field("loras") else missing.format("loras"),
        ),
        (
            "control",
            {},
            "the request has `control_image`, but no random full-size ControlNet is built "
            "here yet (CONTROLNET_MODEL=none)"
            if has_field("control_image")
            else missing.format("control_image"),
        ),
    ]
