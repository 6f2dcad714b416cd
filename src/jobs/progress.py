"""A job's progress updates through the Runpod SDK, throttled so they cost the GPU thread nothing."""

from __future__ import annotations

import time
from typing import Any

from src.model.pipeline import StepCallback
from src.runtime.settings import Settings

# A job's progress updates are sent at most this often (and its last step always).
PROGRESS_EVERY_S = 0.5


def progress_reporter(job: dict[str, Any], settings: Settings) -> StepCallback | None:
    """Progress through the Runpod SDK, only where a platform receives it: the first step, then
    at most one update every PROGRESS_EVERY_S, and the last step.

    The SDK sends each update from a new thread with a new HTTP session; one per step would
    take CPU from the GPU thread (8 of them per 0.2 s job on the tiny CPU model, BENCHMARKS.md).
    """
    if not settings.report_progress:
        return None
    from runpod.serverless import progress_update

    last_sent = -PROGRESS_EVERY_S  # so the first step goes out at once

    def report(step: int, total: int) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if step < total and now - last_sent < PROGRESS_EVERY_S:
            return
        last_sent = now
        progress_update(job, {"stage": "denoise", "step": step, "steps": total})

    return report
