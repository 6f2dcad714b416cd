"""The deployed job loop: the Runpod SDK's own, its idle waits event-driven, its job API calls backing off.

runpod 1.12's `JobScaler` takes jobs in one loop and starts them in another. When every
slot is taken, the taking loop sleeps a whole second before it looks again; the starting
loop looks at its queue only every 100 ms while jobs run. On a GPU that finishes a job in
well under a second, those waits are idle GPU time (measured in BENCHMARKS.md: the GPU
was busy 17% of the time with the SDK's loop and a blocking handler). `JobScaler` here
keeps the SDK's protocol (job-take, batch take, stop channel, results, progress,
heartbeats, shutdown) and changes the waits:

- the taking loop waits until a slot frees (an event that every finished job sets), so the
  next job is asked for the moment one ends;
- the starting loop starts each job as soon as it is queued, so it fetches its inputs
  while the job before it is on the GPU;
- a job that has left the GPU stage (encoding, uploading) gives its slot to the next job,
  up to a bound (src/jobs/slots.py), so a slow store does not keep the GPU waiting.

When Runpod's job API fails, the SDK's loops ask again at once and log every failure, and
its result post gives up after three quick tries and drops the result. Here the taking
loop, the stop-signal poll and the result post back off and log outages, not requests, and
a result is retried until it is stored; the heartbeat keeps its interval but logs the same
way (src/jobs/job_api.py says how).

Each part is installed where the SDK looks it up when the worker starts: the scaler at
`rp_scale.JobScaler`, the result post at `rp_job.send_result` and `rp_progress.send_result`,
the heartbeat at `rp_ping.Heartbeat`. So `runpod.serverless.start` still parses the flags,
runs `--test_input` and `--rp_serve_api` unchanged, and runs its fitness checks and
heartbeat as deployed. The worker may still be loading when `serve` is called (as the last
fitness check: src/jobs/fitness.py), so the scaler asks for it only once it takes jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import requests
import runpod
from runpod.serverless.modules import rp_job, rp_ping, rp_progress, rp_scale
from runpod.version import __version__ as runpod_version

from src.jobs.job_api import FAULTS, Faults, OutageLog, describe, poll_stop_signals, send_result, take_jobs
from src.jobs.slots import Delivery
from src.jobs.worker import Worker

log = rp_scale.log


class JobScaler(rp_scale.JobScaler):
    # Set by `serve`: the loaded worker (built after the fitness checks, before this scaler).
    worker: Callable[[], Worker]

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._slot_freed = asyncio.Event()
        # The worker's jobs past the GPU stage, which hold no slot.
        self.delivery: Delivery = self.worker().delivery or Delivery(bound=0)
        self.delivery.on_change(self._slot_freed.set)

    def stop_taking_jobs(self) -> bool:
        """True once the worker must not take more jobs (a GPU fault)."""
        return self.worker().gpu.faulted

    def current_occupancy(self) -> int:
        """Slots held: jobs queued or in progress, less those delivering (up to the bound)."""
        return super().current_occupancy() - self.delivery.freed()

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

    async def get_jobs(self, session: Any) -> None:
        """The SDK's taking loop, backing off while job-take fails instead of asking again at once."""
        faults = Faults("job-take")
        while self.is_alive():
            await self.set_scale()
            wanted = self.current_concurrency - self.current_occupancy()
            if wanted <= 0:  # shutting down: `set_scale` asked for no slot
                continue
            try:
                jobs = await asyncio.wait_for(take_jobs(session, wanted), timeout=self.jobs_fetcher_timeout)
            except FAULTS as error:
                await self._pause(faults.failed(error))
                continue
            faults.answered()
            for job in jobs:
                await self.jobs_queue.put(job)
                self.job_progress.add(job)
            if jobs:
                log.info(f"Jobs in queue: {self.jobs_queue.qsize()}")

    async def monitor_stop_signals(self, session: Any) -> None:
        """The SDK's stop-channel long-poll, backing off while it fails instead of logging every second."""
        if rp_job._job_stop_url() is None:
            await super().monitor_stop_signals(session)  # the SDK's warning; no stop channel
            return
        faults = Faults("stop-signal poll")
        while self.is_alive():
            try:
                job_ids = await asyncio.wait_for(
                    poll_stop_signals(session), timeout=self.stop_signals_fetcher_timeout
                )
            except FAULTS as error:
                await self._pause(faults.failed(error))
                continue
            faults.answered()
            for job_id in job_ids:
                await self.stop_job(job_id)
            if not job_ids:  # the SDK's floor: a poll answered at once must not spin
                await self._pause(1.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep, ending early on shutdown, so a back-off never delays it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shutdown_event.wait(), timeout=seconds)

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


class Heartbeat(rp_ping.Heartbeat):
    """The SDK's heartbeat process, logging an outage instead of one error line per failed ping."""

    def __init__(self) -> None:
        super().__init__()
        self.outage = OutageLog("heartbeat")

    @staticmethod
    def process_loop(mirror: Any = None, test: bool = False) -> None:
        # The SDK starts this in its own process. urllib3 warns on each retry it makes, naming
        # the ping URL and its query; this process only pings, so its warnings go.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
        heartbeat = Heartbeat()
        heartbeat._mirror = mirror
        heartbeat.ping_loop(test)

    def _send_ping(self) -> None:
        """The SDK's ping (its session retries 5xx and 429 three times), with the outage log."""
        job_ids = self._mirror.get() if self._mirror is not None else None
        try:
            answer = self._session.get(
                self.PING_URL,
                params={"job_id": job_ids, "runpod_version": runpod_version},
                timeout=self.PING_INTERVAL * 2,
            )
        except requests.exceptions.RetryError:
            self.outage.failed("HTTP 5xx or 429 on each of the session's 3 retries")
        except requests.RequestException as error:
            self.outage.failed(describe(error))
        else:
            if answer.ok:
                self.outage.answered()
            else:
                self.outage.failed(f"HTTP {answer.status_code}")


def serves_local_api() -> bool:
    """Whether `runpod.serverless.start` will serve the SDK's FastAPI app, by its own flag and variable."""
    flags, _ = runpod.serverless.parser.parse_known_args()
    return bool(flags.rp_serve_api) or os.environ.get("RUNPOD_REALTIME_PORT", "0") not in ("", "0")


def allow_error_objects() -> None:
    """Let `--rp_serve_api` answer a failed job whose `error` is an object (an OpenAI error object).

    The SDK's local API declares `error` a string in its response model, so FastAPI turns such a
    job into a bare HTTP 500 (the deployed loop's result post carries any JSON). Widening the field's
    type, before the local API builds its routes, is the whole change. Only then is the local API
    imported: FastAPI is 0.18 s of a cold start that the deployed loop does not use.
    """
    from runpod.serverless.modules import rp_fastapi

    error_type = str | dict[str, Any] | None
    rp_fastapi.JobOutput.__annotations__["error"] = error_type
    rp_fastapi.JobOutput.__dataclass_fields__["error"].type = error_type


def serve(handler: Callable[..., Any], worker: Callable[[], Worker]) -> None:
    """`runpod.serverless.start` with this module's scaler: MAX_CONCURRENCY jobs waiting for or on
    the GPU, plus up to as many more that are encoding and uploading (`Worker.delivery`).

    `worker`: the loaded worker, asked for only once jobs are taken (its fitness checks and
    weights may load inside `start`)."""
    JobScaler.worker = staticmethod(worker)
    rp_scale.JobScaler = JobScaler
    rp_job.send_result = send_result  # `rp_job.handle_job` posts each result through this name
    rp_progress.send_result = send_result  # and progress updates through this one
    rp_ping.Heartbeat = Heartbeat  # `Heartbeat.start_ping` starts `Heartbeat.process_loop` by this name
    if serves_local_api():
        allow_error_objects()
    runpod.serverless.start(
        {"handler": handler, "concurrency_modifier": lambda current: worker().settings.max_concurrency}
    )


def runs_fitness_checks() -> bool:
    """Whether `runpod.serverless.start` will run its fitness phase: deployed on the job queue (its
    `worker._is_local` is false: no `--test_input`, RUNPOD_WEBHOOK_GET_JOB set) and not serving the
    local API. Elsewhere nobody runs the checks but the worker itself."""
    flags, _ = runpod.serverless.parser.parse_known_args()
    local = bool(flags.test_input) or os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None
    return not local and not serves_local_api()
