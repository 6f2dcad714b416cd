"""Runpod's job API as the worker calls it, and what the worker does while that API fails.

runpod 1.12's loops ask again at once after any failed job-take but a 429, and log each
failure: measured with job-take answering 503 for 20 s, then `200 {"status": "degraded"}`
for 10 s, one worker sent 54,767 requests and wrote 12 MB of log in those 30 s. Here each
call to the job API backs off while it fails, and logs an outage, not its requests:

- `Backoff`: the wait before asking again, 0.25 s doubling to 5 s, each wait drawn from
  its upper half so that a fleet of workers does not ask in step; at least 5 s after a 429
  (the SDK's own debounce). Reset by the first good answer, so recovery is at most 5 s.
- `OutageLog`: one line when a call starts failing (the cause, with the status code), at
  most one summary a minute while it fails, one line when it answers again. Causes are
  status codes and exception type names, never an exception's text: aiohttp's and
  requests' messages carry the URL, and the job-take URL's query carries secrets.
- `Faults`: the two together, for one call site in src/jobs/job_loop.py.
- `take_jobs`, `poll_stop_signals`, `send_result`: the SDK's three calls, reading an
  answer the way the SDK does but calling a faulty one a fault, so the loops back off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from runpod.serverless.modules import rp_http, rp_job

log = logging.getLogger(__name__)

TOO_MANY_REQUESTS_WAIT_S = 5.0  # the SDK's debounce after a 429; never ask sooner
RESULT_POST_LIMIT_S = 600.0  # a result is retried this long, then dropped with an error line
RESULT_POST_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=10)  # one attempt at a result
PROGRESS_POST_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=5)  # progress is sent once

Clock = Callable[[], float]


class Backoff:
    """How long to wait before the next call while calls fail; `reset` on a good answer."""

    def __init__(
        self, first: float = 0.25, cap: float = 5.0, draw: Callable[[], float] = random.random
    ) -> None:
        self.first, self.cap, self.draw = first, cap, draw
        self.failures = 0

    def next_wait(self, too_many_requests: bool = False) -> float:
        nominal = min(self.cap, self.first * 2**self.failures)
        self.failures = min(self.failures + 1, 32)  # the cap is reached long before; no float overflow
        wait = nominal * (0.5 + 0.5 * self.draw())
        return max(TOO_MANY_REQUESTS_WAIT_S, wait) if too_many_requests else wait

    def reset(self) -> None:
        self.failures = 0


class OutageLog:
    """The log lines of one call's outage. Thread-safe: progress updates post from their own threads."""

    def __init__(
        self,
        call: str,
        clock: Clock = time.monotonic,
        logger: logging.Logger = log,
        summary_every: float = 60.0,
    ) -> None:
        self.call, self.clock, self.logger, self.summary_every = call, clock, logger, summary_every
        self.started: float | None = None  # when the current outage began; None while the call answers
        self.failures = 0
        self._last_line = 0.0
        self._lock = threading.Lock()

    def failed(self, cause: str) -> None:
        with self._lock:
            now = self.clock()
            self.failures += 1
            if self.started is None:
                self.started = self._last_line = now
                self.logger.warning("%s failing: %s; one summary a minute until it answers", self.call, cause)
            elif now - self._last_line >= self.summary_every:
                self._last_line = now
                self.logger.warning(
                    "%s still failing after %.0f s: %d failures, the last: %s",
                    self.call,
                    now - self.started,
                    self.failures,
                    cause,
                )

    def answered(self) -> None:
        with self._lock:
            if self.started is None:
                return
            self.logger.info(
                "%s answering again after %.1f s down, %d failure%s",
                self.call,
                self.clock() - self.started,
                self.failures,
                "" if self.failures == 1 else "s",
            )
            self.started, self.failures = None, 0


class ApiFault(Exception):
    """An answer from the job API that is not one: a refusal, a server error or a malformed body."""

    def __init__(self, cause: str, status: int | None = None) -> None:
        super().__init__(cause)
        self.cause, self.status = cause, status


# What a call to the job API raises when it fails; anything else is a bug and propagates.
FAULTS = (ApiFault, aiohttp.ClientError, TimeoutError)


def describe(error: BaseException) -> str:
    """A fault's cause for the log: a status code or a type name, never the text (it holds the URL)."""
    if isinstance(error, ApiFault):
        return error.cause
    if isinstance(error, aiohttp.ClientResponseError):
        return f"HTTP {error.status}"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return f"no answer ({type(error).__name__})"


class Faults:
    """One call site's back-off and outage log: `failed` logs and says how long to wait."""

    def __init__(self, call: str, clock: Clock = time.monotonic) -> None:
        self.backoff = Backoff()
        self.outage = OutageLog(call, clock)

    def failed(self, error: BaseException) -> float:
        self.outage.failed(describe(error))
        return self.backoff.next_wait(too_many_requests=getattr(error, "status", None) == 429)

    def answered(self) -> None:
        self.backoff.reset()
        self.outage.answered()


def _refused(status: int) -> ApiFault | None:
    return ApiFault(f"HTTP {status}", status) if status >= 300 else None


def _json_body(body: bytes, content_type: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ApiFault(f"HTTP 200 with a body that is not JSON ({content_type})") from None


async def take_jobs(session: aiohttp.ClientSession, count: int) -> list[dict[str, Any]]:
    """Up to `count` jobs from job-take (the batch endpoint for more than one); [] when none is queued."""
    async with session.get(rp_job._job_get_url(count)) as answer:
        # 400 is what job-take answers a FlashBoot worker with nothing to do (the SDK's reading).
        if answer.status in (204, 400):
            return []
        if fault := _refused(answer.status):
            raise fault
        body, content_type = await answer.read(), answer.content_type
    if not body.strip():  # an empty 200: no job, as the SDK reads it
        return []
    payload = _json_body(body, content_type)
    jobs = payload if isinstance(payload, list) else [payload]
    if not all(isinstance(job, dict) and "id" in job and "input" in job for job in jobs):
        raise ApiFault("HTTP 200 without a job's id and input in it")
    return jobs


async def poll_stop_signals(session: aiohttp.ClientSession) -> list[str]:
    """The ids of jobs to stop, from the stop channel's long-poll; [] when none."""
    async with session.get(rp_job._job_stop_url()) as answer:
        if answer.status == 204:
            return []
        if fault := _refused(answer.status):
            raise fault
        body, content_type = await answer.read(), answer.content_type
    payload = _json_body(body, content_type) if body.strip() else {}
    # A dict without `jobsToStop` is nothing to stop, as the SDK reads it (the loop's 1 s floor
    # bounds such polls); anything else is a fault.
    if not isinstance(payload, dict) or not isinstance(payload.get("jobsToStop", []), list):
        raise ApiFault("HTTP 200 without a jobsToStop list")
    return [job_id for job_id in payload.get("jobsToStop", []) if isinstance(job_id, str)]


# Results and progress updates go to the same job-done endpoint: one outage log for both.
JOB_DONE = OutageLog("job-done post")


async def _post_job_done(
    session: aiohttp.ClientSession, job_id: str, body: str, is_stream: bool, timeout: aiohttp.ClientTimeout
) -> None:
    url = rp_http.JOB_DONE_URL.replace("$ID", job_id) + f"&isStream={'true' if is_stream else 'false'}"
    # The SDK's headers; X-Request-ID per request, not set on the shared session as the SDK does.
    headers = {
        "charset": "utf-8",
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Request-ID": job_id,
    }
    async with session.post(url, data=body, headers=headers, timeout=timeout) as answer:
        if fault := _refused(answer.status):
            raise fault
        await answer.read()


def _worth_retrying(error: BaseException) -> bool:
    """Server errors, 429s and no answer at all; another 4xx would be refused again."""
    status = getattr(error, "status", None)
    return status is None or status == 429 or status >= 500


async def send_result(
    session: aiohttp.ClientSession,
    job_data: dict[str, Any],
    job: dict[str, Any],
    is_stream: bool = False,
    limit_s: float = RESULT_POST_LIMIT_S,
) -> bool:
    """The SDK's `send_result`, which drops a result after three quick tries, retried until it is stored.

    A result is posted with the back-off above for up to `limit_s` (10 minutes), not after a
    4xx other than 429. A progress update is posted once: the next one supersedes it. True
    once stored.
    """
    job_id = job["id"]
    final = job_data.get("status") != "IN_PROGRESS"
    try:
        body = json.dumps(job_data, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        log.error("job %s: its result is not JSON (%s); nothing was posted", job_id, type(err).__name__)
        return False
    backoff, give_up = Backoff(), time.monotonic() + limit_s
    timeout = RESULT_POST_TIMEOUT if final else PROGRESS_POST_TIMEOUT
    while True:
        try:
            await _post_job_done(session, job_id, body, is_stream, timeout)
        except FAULTS as error:
            JOB_DONE.failed(describe(error))
            if not final:
                return False
            if not _worth_retrying(error):
                log.error("job %s: result refused (%s); not retried", job_id, describe(error))
                return False
            if time.monotonic() > give_up:
                log.error(
                    "job %s: result dropped after %.0f s of failed posts, the last: %s",
                    job_id,
                    limit_s,
                    describe(error),
                )
                return False
            await asyncio.sleep(backoff.next_wait(too_many_requests=getattr(error, "status", None) == 429))
        else:
            JOB_DONE.answered()
            if final:
                rp_http.log.info("Finished.", job_id)  # the SDK's line, as its send_result writes it
            return True
