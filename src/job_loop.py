"""The deployed job loop: the Runpod SDK's own, with its two idle waits made event-driven.

runpod 1.12's `JobScaler` takes jobs in one loop and starts them in another. When every
slot is taken, the taking loop sleeps a whole second before it looks again; the starting
loop looks at its queue only every 100 ms while jobs run. On a GPU that finishes a job in
well under a second, those waits are idle GPU time (measured in BENCHMARKS.md: the GPU
was busy 17% of the time with the SDK's loop and a blocking handler). `JobScaler` here
keeps everything else of the SDK's (job-take, batch take, stop channel, results, progress,
heartbeats, shutdown) and changes only the waits:

- the taking loop waits until a slot frees (an event that every finished job sets), so the
  next job is asked for the moment one ends;
- the starting loop starts each job as soon as it is queued, so it fetches its inputs
  while the job before it is on the GPU.

It is installed where the SDK's worker builds its scaler (`rp_scale.JobScaler`), so
`runpod.serverless.start` still parses the flags, runs `--test_input` and
`--rp_serve_api` unchanged, and runs its fitness checks and heartbeat as deployed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import runpod
from runpod.serverless.modules import rp_scale

log = rp_scale.log


class JobScaler(rp_scale.JobScaler):
    # Set by `serve`: True once the worker must not take more jobs (a GPU fault).
    stop_taking_jobs: Callable[[], bool] = staticmethod(lambda: False)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._slot_freed = asyncio.Event()

    async def set_scale(self) -> None:
        """Called at the top of every round of the SDK's taking loop: return once a slot is free."""
        await super().set_scale()
        while self.is_alive():
            if self.stop_taking_jobs():
                log.info("Taking no more jobs: this worker asked to be replaced.")
                self.kill_worker()
                break
            self._slot_freed.clear()
            if self.current_occupancy() < self.current_concurrency:
                return
            with contextlib.suppress(TimeoutError):  # a bounded wait, so a shutdown is seen
                await asyncio.wait_for(self._slot_freed.wait(), timeout=1.0)
        # Shutting down: with no slot asked for, the SDK's loop ends instead of taking one more job.
        self.current_concurrency = 0

    async def run_jobs(self, session: Any) -> None:
        """Start each queued job at once; the taking loop already bounds how many there are."""
        tasks: set[asyncio.Task] = set()
        while self.is_alive() or not self.jobs_queue.empty():
            try:
                job = await asyncio.wait_for(self.jobs_queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            task = asyncio.create_task(self.handle_job(session, job))
            self.jobs_tasks[job["id"]] = task
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.error(f"JobScaler.run_jobs | Task failed during shutdown drain: {result}")

    async def handle_job(self, session: Any, job: dict[str, Any]) -> None:
        try:
            await super().handle_job(session, job)
        finally:
            self._slot_freed.set()


def serve(handler: Callable[..., Any], max_concurrency: int, stop_taking_jobs: Callable[[], bool]) -> None:
    """`runpod.serverless.start` with this module's scaler and `max_concurrency` jobs in flight."""
    JobScaler.stop_taking_jobs = staticmethod(stop_taking_jobs)
    rp_scale.JobScaler = JobScaler
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: max_concurrency})
