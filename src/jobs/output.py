"""A job's response, as API.md gives it: `image_url` (and `images` for more than one), `seed`,
`cost`, the model and size it ran at, `has_nsfw_concepts`, `timings` and `expanded_prompt`."""

from __future__ import annotations

import json
from typing import Any

from src.request.models import MODELS
from src.request.pricing import job_cost, per_megapixel
from src.request.schema import GenerateRequest
from src.runtime.errors import JobError
from src.runtime.settings import Settings
from src.runtime.timing import Stopwatch

# Runpod rejects results over 20 MB (/run: 10 MB); data URIs past that fail the job instead.
MAX_RESULT_BYTES = 20_000_000
TIMING_KEYS = (
    "load_input",
    "load_loras",
    "preprocess_control",
    "expand_prompt",
    "encode_prompt",
    "denoise",
    "decode",
    "safety",
    "encode_image",
    "upload",
    "resample",
    "refine",
)


def job_output(
    settings: Settings,
    request: GenerateRequest,
    seed: int,
    kept: list[int],
    urls: list[str],
    flags: list[bool],
    clock: Stopwatch,
    expanded: str | None = None,
) -> dict[str, Any]:
    """The response of API.md: the kept images' URLs and seeds, what they cost, the timings."""
    seeds = [(seed + i) % 2**32 for i in kept]
    output: dict[str, Any] = {"image_url": urls[0]}
    if request.num_images > 1:
        output["images"] = [{"image_url": url, "seed": s} for url, s in zip(urls, seeds, strict=True)]
    price = getattr(settings, MODELS[request.model].price_field)
    if request.upscale is not None:  # priced by the output's size, whatever the model
        price = per_megapixel(settings.upscale_price_per_mp_usd, request.width, request.height)
    timings = {key: clock.timings.get(key, 0.0) for key in TIMING_KEYS}
    timings["total"] = clock.total_ms()
    output.update(
        seed=seeds[0],
        cost=job_cost(
            price,
            len(kept),
            settings.prompt_expansion_price_usd if expanded else 0.0,
        ),
        model=request.model,
        acceleration=request.acceleration,
        width=request.width,
        height=request.height,
        output_format=request.output_format,
        has_nsfw_concepts=flags,
        timings=timings,
    )
    if expanded:
        output["expanded_prompt"] = expanded
    size = len(json.dumps(output))
    if size > MAX_RESULT_BYTES:  # only data URIs get this big; a cut or broken result is worse
        raise JobError(
            f"output: {len(urls)} {request.output_format} image(s) at {request.size} make a "
            f"{size / 1e6:.1f} MB response, over Runpod's {MAX_RESULT_BYTES // 1_000_000} MB result "
            "limit (10 MB for /run). Configure a bucket (BUCKET_* settings), or use output_format "
            "'jpeg' or 'webp', fewer images, or a smaller size."
        )
    return output
