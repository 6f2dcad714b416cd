"""The modes added after text-to-image (inpainting, outpainting, LoRAs, control, ...), found from the
request model.

Each one's row turns on when its field lands in `GenerateRequest`; until then it is a named
skip. Kept apart from sections.py so that adding a mode touches only this table.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import ZImageControlNetModel, ZImagePipeline, ZImageTransformer2DModel
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from src.control.configs import release_config
from src.jobs.startup import ServedModel
from src.jobs.worker import Worker
from src.lora.adapters import LoraAdapters
from src.model.pipeline import ZImageGenerator
from src.request.models import MODELS
from src.request.schema import GenerateRequest
from src.runtime.settings import Settings

# Run on the worker's GPU thread before the mode's jobs; what it returns goes into the mode's row.
Prepare = Callable[[Worker], dict[str, Any]]
BASE = "z-image"


class Mode(NamedTuple):
    name: str
    job: dict[str, Any]  # what the job adds to plain text-to-image
    skipped: str | None  # why this version cannot run it, or None
    prepare: Prepare | None = None
    runs: int | None = None  # timed jobs, where fewer than GPU_BENCH_RUNS fit its box


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


def widened(width: int, height: int) -> dict[str, int]:
    """`outpaint` margins that make a `width` x `height` picture 16:9 (1024x1024: 398 a side, a
    1820x1024 canvas, which size `auto` rounds down to 1808*1024)."""
    added = max(round(height * 16 / 9) - width, 2)
    return {"left": added // 2, "right": added - added // 2}


def _random_on_device(model: type[torch.nn.Module], config: dict[str, Any], like: torch.nn.Module):
    """`model(**config)` with torch's default random init, made straight in `like`'s dtype and on
    its device: no multi-GB file to write and read, and no float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(like.dtype)
    try:
        with torch.device(like.device):
            return model(**config).eval()
    finally:
        torch.set_default_dtype(previous)


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
    config = release_config("2.1", transformer.config)
    controlnet = _random_on_device(ZImageControlNetModel, config, transformer)
    if generator.device.type == "cuda":
        torch.cuda.synchronize()
    built_s = time.perf_counter() - start
    params = sum(p.numel() for p in controlnet.parameters())  # before it takes the shared modules
    worker.models["z-image-turbo"].generator = ZImageGenerator(
        generator.text_to_image, generator.device, controlnet
    )
    worker.generator.accelerate(worker.settings.precision, compile_blocks=False)
    return {"controlnet": "2.1, random", "params": params, "build_s": round(built_s, 1)}


def random_base(worker: Worker) -> dict[str, Any]:
    """Serve the base model beside Turbo: a second random transformer of the real size.

    The base is Turbo's architecture with other weights (src/model/family.py), so its transformer
    is built from Turbo's config on the worker's device, and the pipeline takes Turbo's text
    encoder, tokenizer, VAE and prompt cache, as a worker with both models shares them. Its
    time per step is the real base's; only the pixels mean nothing.
    """
    turbo = worker.models["z-image-turbo"]
    pipe, device = turbo.generator.text_to_image, turbo.generator.device
    start = time.perf_counter()
    transformer = _random_on_device(ZImageTransformer2DModel, dict(pipe.transformer.config), pipe.transformer)
    with torch.no_grad():  # torch.empty-initialised pad tokens could hold NaNs
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    built_s = time.perf_counter() - start
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    base = ZImagePipeline(**{**pipe.components, "transformer": transformer, "scheduler": scheduler})
    generator = ZImageGenerator(base, device, prompts=turbo.generator.prompts)
    generator.accelerate(worker.settings.precision, compile_blocks=False)
    loras = LoraAdapters(base, turbo.loras.files, worker.settings.lora_max_loaded)
    worker.models[BASE] = ServedModel(generator, loras)
    params = sum(p.numel() for p in transformer.parameters())
    return {"transformer": "random, Turbo's config", "params": params, "build_s": round(built_s, 1)}


def random_expander(worker: Worker) -> dict[str, Any]:
    """Give the worker a prompt expander over its own text encoder (Qwen3-4B's shapes, random).

    As src/model/expander_weights.py builds it from Qwen/Qwen3-4B: every tensor the encoder's but
    the last layer's MLP up and down projections, the head tied to the embeddings (so ~0.1 GB
    more). Timed first through the worker's own loop (benchmarks/cost/expansion.py): on CUDA a
    300-token prompt, then exactly 200 new tokens; the compile of the one-token step happens there.
    """
    from benchmarks.cost.expansion import expander_over, time_rewrites

    generator = worker.generator
    start = time.perf_counter()
    expander = expander_over(generator.text_encoder, generator.text_to_image.tokenizer)
    # gpu.sh --tiny (the CPU): the row's shape in a second or two, not the GPU's 200 tokens.
    prompt_tokens, tokens, repeats = (300, 200, 3) if generator.device.type == "cuda" else (30, 20, 1)
    figures = time_rewrites(expander, prompt_tokens=prompt_tokens, tokens=tokens, repeats=repeats)
    if generator.device.type != "cuda":
        expander.max_new_tokens = tokens  # the tiny random model's job rewrites, as short
    worker.expander = expander
    config = expander.model.config
    return {
        "expander": f"random, {config.num_hidden_layers} layers x {config.hidden_size}, sharing the encoder",
        "prompt_tokens": prompt_tokens,
        "new_tokens": tokens,
        "prefill_ms": round(figures["prefill_ms"], 1),
        "ms_per_new_token": round(figures["ms_per_token"], 2),
        "rewrite_ms": round(figures["rewrite_ms"], 1),
        "build_and_time_s": round(time.perf_counter() - start, 1),
    }


def newer_modes(image: str, width: int, height: int) -> list[Mode]:
    """Each mode added after text-to-image, in the order the modes section runs them."""
    missing = "not in this version: the request model has no `{}` field"
    base_card = MODELS.get(BASE)
    # The base's defaults, written out: 50 steps, guidance 4, and a negative prompt (a real one
    # costs the same as none: both are one more batch row).
    base_job = {"model": BASE, "negative_prompt": "blurry, low quality"} | (
        {"num_inference_steps": base_card.default_steps, "guidance_scale": base_card.default_guidance}
        if base_card
        else {}
    )
    no_base = None if has_field("model") and base_card else missing.format("model")
    no_acceleration = None if has_field("acceleration") else missing.format("acceleration")
    return [
        Mode(
            # Turbo's defaults (8 steps) with the step cache (src/model/acceleration.py). First, on
            # the worker as the text_to_image row ran (no LoRA loaded yet, no ControlNet), so their
            # denoise_ms compares with that row's.
            "acceleration regular",
            {"acceleration": "regular"},
            no_acceleration,
            runs=3,
        ),
        Mode("acceleration high", {"acceleration": "high"}, no_acceleration, runs=3),
        Mode(
            "inpainting",
            {"image": image, "mask": centre_mask(width, height), "strength": 1.0},
            None if has_field("mask") else missing.format("mask"),
        ),
        Mode(
            # The picture widened to 16:9 through the inpainting pipeline: a larger output at the
            # same price per image; compare its denoise_ms with inpainting's at the smaller size.
            "outpainting",
            {"image": image, "size": "auto", "outpaint": widened(width, height)},
            None if has_field("outpaint") else missing.format("outpaint"),
            runs=2,
        ),
        Mode(
            "lora activation",
            {"loras": [{"path": LORA_FILE, "scale": 1.0}]},
            None if has_field("loras") else missing.format("loras"),
        ),
        Mode(
            # Text-to-image with control; the picture is the control map as sent (no preprocessing).
            "control",
            {"control_image": image},
            None if has_field("control_image") else missing.format("control_image"),
            random_controlnet,
        ),
        Mode(
            # Near the end: the slowest rows (2 x 50 transformer passes an image), so a box cut
            # leaves the rest.
            "base model",
            base_job,
            no_base,
            random_base,
            runs=2,
        ),
        Mode(
            # On the base that "base model" built (so after it, and no prepare of its own): compare
            # its denoise_ms with that row's.
            "base acceleration high",
            {**base_job, "acceleration": "high"},
            no_base or no_acceleration,
            runs=1,
        ),
        Mode(
            # Last: it compiles the expander's step (CUDA), so a box cut leaves every other row. The
            # job's expand_prompt_ms is a random model's rewrite, of whatever length it samples.
            "prompt expansion",
            {"enable_prompt_expansion": True},
            None if has_field("enable_prompt_expansion") else missing.format("enable_prompt_expansion"),
            random_expander,
            runs=1,
        ),
    ]
