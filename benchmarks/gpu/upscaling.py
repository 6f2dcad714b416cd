"""The upscaling section of `bash benchmarks/gpu.sh`: a 1024x1024 picture to 2048x2048 and to
4096x4096 at strength 0.35 (Turbo's 8 steps: 3 run), without and then with the Tile ControlNet.

The Tile ControlNet is a random one of Tile 2.1's size (Union 2.1's architecture, 3.36B parameters
on the full-size model), built on the GPU as the modes section builds the Union: no 6.7 GB file.
Each row: the output size, the tiles and tile steps, the seconds of the job and its stages, the
peak `max_memory_allocated`. One 2048x2048 job warms up first (not timed); each row is one job,
since a 4096x4096 one takes seconds. With --tiny (the CPU), a 128x128 picture to 256x256 and
512x512 in tiles of 256: the code path and the rows' shape, not the figures.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

from diffusers import ZImageControlNetModel

from benchmarks.gpu.bench import emit
from benchmarks.gpu.modes import _random_on_device
from benchmarks.gpu.sections import CONFIG, handle, peak_gib, reset_peak, stages, start_worker
from benchmarks.run import photo_like
from src.control.configs import release_config
from src.jobs.worker import Worker
from src.model import tiles
from src.model.acceleration import steps_run
from src.model.pipeline import ZImageGenerator

STRENGTH = 0.35
FACTORS = (2.0, 4.0)


def random_tile_controlnet(worker: Worker) -> dict[str, Any]:
    """Rebuild the worker's generator with a random Tile ControlNet, as Worker.start would bind one."""
    generator = worker.generator
    transformer = generator.text_to_image.transformer
    start = time.perf_counter()
    controlnet = _random_on_device(
        ZImageControlNetModel, release_config("2.1", transformer.config), transformer
    )
    params = sum(p.numel() for p in controlnet.parameters())  # before it takes the shared modules
    parts = {"tile_controlnet": controlnet, "upscale_tile": worker.settings.upscale_tile}
    rebuilt = ZImageGenerator(generator.text_to_image, generator.device, parts=parts)
    rebuilt.accelerate(worker.settings.precision, compile_blocks=False)
    worker.models["z-image-turbo"].generator = rebuilt
    return {"params": params, "build_s": round(time.perf_counter() - start, 1)}


def run() -> None:
    side, tile = (128, 256) if CONFIG.tiny else (1024, 1024)
    worker = start_worker(upscale_tile=tile)
    buffer = io.BytesIO()
    photo_like(side).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    steps = 2 if CONFIG.tiny else 8
    job = {"image": image, "strength": STRENGTH, "num_inference_steps": steps, "output_format": "jpeg"}
    handle(worker, {**job, "upscale": {"factor": FACTORS[0]}, "seed": 1000})  # warm-up
    for tile_controlnet in (False, True):
        added = worker.gpu.call(lambda: random_tile_controlnet(worker)) if tile_controlnet else {}
        for factor in FACTORS:
            reset_peak()
            started = time.perf_counter()
            out = handle(worker, {**job, "upscale": {"factor": factor}, "seed": 1})
            seconds = round(time.perf_counter() - started, 2)
            width, height = out["width"], out["height"]
            count = len(tiles.views(height // 8, width // 8, tile // 8, 2))
            row = {
                "size": f"{side}*{side} -> {width}*{height}",
                "tile_controlnet": tile_controlnet,
                "strength": STRENGTH,
                "tiles": count,
                "tile_steps": count * steps_run(steps, STRENGTH),
                "seconds": seconds,
                **stages([out]),
                "peak_gib": peak_gib(),
                "cost": out["cost"],
            }
            emit("upscaling", {**row, **added})
