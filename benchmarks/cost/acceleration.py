"""Acceleration levels: denoise time and pixel change per model and level, on the tiny models (CPU).

    python benchmarks/cost/acceleration.py --runs 3 --out benchmarks/results/acceleration.md

Turbo at 30 steps (guidance 0) and a base-shaped tiny model at 50 steps (guidance 4.0 with a
negative prompt), both loaded by one `Worker.start`, at 1024*1024. For each model, one warm-up
round, then `--runs` rounds; a round runs every level of src/model/acceleration.py's table with
the same prompt and seed, so machine noise falls on all levels alike and the pixels compare one
to one with `none`'s. Denoise times are the jobs' own `timings`; medians over the rounds.
The tiny models say what the step cache saves and how far it moves the pixels of a random
model; the quality it keeps can only be judged on the real weights.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import math
import statistics
import sys
import tempfile
from dataclasses import astuple
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The cyclic GC paused while torch and diffusers import (as handler.py does): it would walk their
# half a million new objects again and again, about a fifth of the import time.
gc.disable()
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import results_file  # noqa: E402
from builder.tiny_model import build_tiny_base, build_tiny_zimage  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.model.acceleration import LEVELS, steps_computed  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

gc.enable()

PROMPT = "a harbour at dawn"
NEGATIVE = "blurry, low quality"
# Targets for the levels that skip work, as a fraction of `none`'s denoise time; they apply from
# TARGET_MIN_STEPS steps up (fewer steps leave too few to skip).
TARGETS = {"regular": 0.85, "high": 0.6}
TARGET_MIN_STEPS = 30


def pixels(output: dict[str, Any]) -> np.ndarray:
    """The job's image (a PNG data URI) as 0-255 RGB values."""
    data = base64.b64decode(output["image_url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def measure(
    worker: Worker, loop: asyncio.AbstractEventLoop, model: str, job: dict[str, Any], runs: int
) -> dict[str, dict[str, list]]:
    """Per level: the denoise ms and the pixels of each timed round (the warm-up round dropped)."""
    levels = list(LEVELS[model])
    found: dict[str, dict[str, list]] = {level: {"denoise": [], "pixels": []} for level in levels}
    for i in range(runs + 1):  # round 0 is the warm-up
        for level in levels:
            request = {**job, "prompt": f"{PROMPT} {i}", "seed": i, "acceleration": level}
            output = loop.run_until_complete(worker.run(f"{model}-{level}-{i}", request))
            denoise = output["timings"]["denoise"]
            print(f"{model} {level} round {i}: denoise {denoise:.1f} ms", flush=True)
            if i > 0:
                found[level]["denoise"].append(denoise)
                found[level]["pixels"].append(pixels(output))
    return found


def rows_for(model: str, steps: int, found: dict[str, dict[str, list]]) -> list[dict[str, Any]]:
    plain = found["none"]
    plain_ms = statistics.median(plain["denoise"])
    rows = []
    for level, samples in found.items():
        schedule = LEVELS[model][level]
        ms = statistics.median(samples["denoise"])
        ratio = ms / plain_ms
        pairs = list(zip(samples["pixels"], plain["pixels"], strict=True))
        diffs = [np.abs(a - b) for a, b in pairs]
        worst_psnr = min(psnr(a, b) for a, b in pairs)
        target = TARGETS.get(level)
        if target is None:
            verdict = "-"
        elif steps < TARGET_MIN_STEPS:
            verdict = f"n/a (<{TARGET_MIN_STEPS} steps)"
        else:
            verdict = f"{'PASS' if ratio <= target else 'FAIL'} (<= {target}x)"
        rows.append(
            {
                "model": model,
                "steps": steps,
                "level": level,
                "schedule (warm_up/interval/cool_down)": (
                    "-" if schedule is None else "/".join(str(n) for n in astuple(schedule))
                ),
                "blocks run": f"{steps_computed(schedule, steps)} of {steps}",
                "denoise ms": round(ms, 1),
                "vs none": round(ratio, 2),
                "target": verdict,
                "mean abs diff": round(float(np.mean([d.mean() for d in diffs])), 2),
                "max abs diff": int(max(d.max() for d in diffs)),
                "PSNR dB (worst round)": "identical" if math.isinf(worst_psnr) else round(worst_psnr, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="1024*1024")
    parser.add_argument("--turbo-steps", type=int, default=30)
    parser.add_argument("--base-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/acceleration.md")
    args = parser.parse_args()
    jobs = {
        "z-image-turbo": {"num_inference_steps": args.turbo_steps, "guidance_scale": 0.0},
        "z-image": {
            "num_inference_steps": args.base_steps,
            "guidance_scale": 4.0,
            "negative_prompt": NEGATIVE,
        },
    }
    # One event loop for every job: the worker's locks and queues belong to the loop that first used them.
    loop = asyncio.new_event_loop()
    load_before = results_file.load_average()  # a shared machine slows every level; the ratios stay readable
    rows = []
    with tempfile.TemporaryDirectory(prefix="zimage-acceleration-") as tmp:
        turbo = build_tiny_zimage(Path(tmp) / "turbo")
        base = build_tiny_base(turbo, Path(tmp) / "base")
        worker = Worker.start(Settings(model=str(turbo), base_model=str(base), safety_checker_model="none"))
        for model, extra in jobs.items():
            found = measure(worker, loop, model, {"size": args.size, "model": model, **extra}, args.runs)
            rows += rows_for(model, extra["num_inference_steps"], found)
    loop.close()
    facts = [
        f"{args.size}; Turbo {args.turbo_steps} steps, guidance 0; base {args.base_steps} steps, guidance "
        f"4.0 and a negative prompt; PNG, data URI. Medians of {args.runs} rounds after a warm-up round, "
        "each round every level with one prompt and seed; pixel differences against `none`'s image of "
        "the same round (0-255, all channels)"
    ]
    header = results_file.header("Acceleration levels (tiny models)", facts, load_at_start=load_before)
    results_file.write(args.out, header + results_file.table(rows))
    print("\n".join(results_file.table(rows)))


if __name__ == "__main__":
    main()
