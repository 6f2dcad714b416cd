"""The plan `auto` picks for the real weights on each card size, from the worker's own estimator.

    python benchmarks/memory_table.py

The models are built on the meta device from their published configs (benchmarks/full_size.py,
src/control/configs.py): every byte count is exact, no weight is read. The smaller parts are
counted from their published parameter counts. Working memory is src/model/memory.py's estimate
for the largest accepted job (2048x2048, 4 images, guidance, control where loaded, LORA_MAX_LOADED
adapters of rank memory.LORA_RANK or as few as the plan keeps, expansion where loaded, and a
4096x4096 upscale in tiles of 1024). docs/memory.md holds its output.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import ZImageControlNetModel  # noqa: E402

from benchmarks.full_size import QWEN3_4B, full_size_pipeline  # noqa: E402
from src.control.configs import release_config  # noqa: E402
from src.model import memory, placement  # noqa: E402
from src.model.memory import GB, MemoryRefusal  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

CARDS = (16, 24, 48, 80)
CONTEXT = int(0.5 * GB)  # the CUDA context and cuBLAS workspaces, outside torch's allocator
BF16 = 2
# Published parameter counts of the parts not built here, loaded in bf16 on the GPU.
SAFETY = 86_000_000 * BF16  # Falconsai/nsfw_image_detection (ViT-base)
CONTROL_HELPERS = (25_000_000 + 90_000_000 + 43_000_000) * BF16  # depth-anything small, ViTPose, RT-DETR
# The expander's own weights beside Turbo's text encoder: layer 35's up and down projections
# (docs/prompt-expansion.md); the rest are the encoder's Parameters.
EXPANDER = 2 * QWEN3_4B["hidden_size"] * QWEN3_4B["intermediate_size"] * BF16


def presets() -> dict[str, tuple[memory.Parts, memory.Shapes]]:
    turbo = full_size_pipeline("meta")
    base = full_size_pipeline("meta").transformer
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            config = release_config("2.1", turbo.transformer.config)
            controlnet = ZImageControlNetModel(**config)
            tile = ZImageControlNetModel(**config)  # Tile 2.1: Union 2.1's architecture (configs.py)
    finally:
        torch.set_default_dtype(previous)
    encoders, vaes = [turbo.text_encoder], [turbo.vae]
    rows = {
        "Turbo": ([turbo.transformer], None, None, 0, 0),
        "Turbo + base": ([turbo.transformer, base], None, None, 0, 0),
        "Turbo + ControlNet": ([turbo.transformer], controlnet, None, 0, CONTROL_HELPERS),
        "Turbo + Tile ControlNet": ([turbo.transformer], None, tile, 0, 0),
        "Turbo + expander": ([turbo.transformer], None, None, EXPANDER, 0),
    }
    table = {}
    for name, (transformers, control, tiles, expander, helpers) in rows.items():
        parts = placement.measure(transformers, encoders, vaes, control, tile_controlnet=tiles)
        parts = memory.replace(parts, expander=expander, others=SAFETY + helpers)
        shapes = placement.shapes_of(turbo.transformer, turbo.vae, turbo.text_encoder, control, tiles)
        table[name] = parts, shapes
    return table


def rows() -> list[str]:
    job = placement.worst_job(Settings.lora_max_loaded)
    lines = [
        "| preset | weights (bf16) | " + " | ".join(f"{card} GB card" for card in CARDS) + " |",
        "|---|---|" + "---|" * len(CARDS),
    ]
    for name, (parts, shapes) in presets().items():
        cells = []
        for card in CARDS:
            try:
                choice = memory.choose("auto", parts, shapes, card * GB, CONTEXT, job)
                cells.append(
                    f"`{choice.plan.name}`, {choice.lora_slots} LoRA slots, "
                    f"{(choice.need + CONTEXT) / GB:.1f} GB (estimated)"
                )
            except MemoryRefusal:
                fewest = memory.replace(job, loras=memory.MIN_LORA_SLOTS)
                need = memory.need(memory.TABLE["fp8"], parts, shapes, fewest) + CONTEXT
                cells.append(f"refused: fp8 needs {need / GB:.1f} GB (estimated)")
        lines.append(f"| {name} | {parts.total / GB:.1f} GB | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(rows()))
