"""Runpod's job API failing under the worker: it backs off, logs outages, loses no result.

Three tiers: the back-off and the outage log on a fake clock; the job API calls of
src/jobs/job_api.py against the loopback job queue (tests/loopback_servers.py:JobQueue), each
fault it can answer with; and `python handler.py`, as deployed, through outages of that
queue. runpod 1.12's own loop, measured the same way, sent 54,767 job-take requests in a
30 s outage and logged one line for each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest
from runpod.serverless.modules import rp_http, rp_job

from src.jobs.job_api import ApiFault, Backoff, OutageLog, send_result, take_jobs
from tests.conftest import end_process, worker_env
from tests.loopback_servers import (
    DEGRADED,
    DROPPED,
    NOT_JSON,
    TOO_MANY,
    UNAVAILABLE,
    Answer,
    JobQueue,
    deployed_worker,
)
from tests.test_job_loop import START_SECONDS, text_job

# The job-take and job-done URLs carry secrets in their query on Runpod: none may reach the log.
QUERY_SECRET = "wk-7d1c9e4f0b2a"
QUERY = f"gpu=cpu&worker_key={QUERY_SECRET}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- back-off
def test_the_wait_doubles_from_a_quarter_second_to_five_and_resets_on_an_answer():
    highest = Backoff(draw=lambda: 1.0)
    assert [highest.next_wait() for _ in range(8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    lowest = Backoff(draw=lambda: 0.0)  # jitter takes each wait down to half, no lower
    assert [lowest.next_wait() for _ in range(6)] == [0.125, 0.25, 0.5, 1.0, 2.0, 2.5]
    highest.reset()
    assert highest.next_wait() == 0.25
    jittered = Backoff()
    waits = [jittered.next_wait() for _ in range(10_000)][5:]
    assert 2.5 <= min(waits) < 2.6 and 4.9 < max(waits) <= 5.0


def test_a_429_waits_at_least_the_sdks_five_seconds():
    backoff = Backoff(draw=lambda: 0.0)
    assert backoff.next_wait(too_many_requests=True) == 5.0
    assert backoff.next_wait() == 0.25  # the count goes on: a 429 is a failure like another


def test_after_five_seconds_of_failures_there_are_at_most_two_calls_a_second():
    # Calls that fail at once with the shortest waits jitter allows: the fastest a worker asks.
    for draw in (lambda: 0.0, lambda: 1.0):
        backoff, now, calls = Backoff(draw=draw), 0.0, []
        while now < 120:
            calls.append(now)
            now += backoff.next_wait()
        late = [t for t in calls if t >= 5.0]
        assert all(b - a >= 0.5 for a, b in zip(late, late[1:], strict=False)), late[:5]
        assert len(calls) < 60  # two minutes down: the SDK would have asked hundreds of thousands of times


# --------------------------------------------------------------------------- outage log
def test_an_outage_logs_one_line_as_it_starts_one_a_minute_and_one_as_it_ends(caplog):
    clock = FakeClock()
    outage = OutageLog("job-take", clock, logging.getLogger("test.outage"))
    caplog.set_level(logging.INFO, "test.outage")

    outage.answered()  # answering while nothing failed: nothing to say
    for i in range(1200):  # ten minutes down, two failures a second
        outage.failed("HTTP 503" if i < 600 else "HTTP 200 without a job's id and input in it")
        clock.now += 0.5
    outage.answered()
    outage.answered()

    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "job-take failing: HTTP 503; one summary a minute until it answers"
    summaries = lines[1:-1]
    assert len(summaries) == 9, summaries  # at 60, 120, ... 540 s; none at 0 s, the start line is there
    assert summaries[0] == "job-take still failing after 60 s: 121 failures, the last: HTTP 503"
    assert summaries[-1].endswith("1081 failures, the last: HTTP 200 without a job's id and input in it")
    assert lines[-1] == "job-take answering again after 600.0 s down, 1200 failures"
    assert [r.levelname for r in caplog.records] == ["WARNING"] * 10 + ["INFO"]


def test_each_outage_has_its_own_lines(caplog):
    clock = FakeClock()
    outage = OutageLog("heartbeat", clock, logging.getLogger("test.outage"))
    caplog.set_level(logging.INFO, "test.outage")
    for cause in ("no answer (ConnectionError)", "HTTP 502"):
        outage.failed(cause)
        clock.now += 3
        outage.failed(cause)
        outage.answered()
    assert [record.getMessage() for record in caplog.records] == [
        "heartbeat failing: no answer (ConnectionError); one summary a minute until it answers",
        "heartbeat answering again after 3.0 s down, 2 failures",
        "heartbeat failing: HTTP 502; one summary a minute until it answers",
        "heartbeat answering again after 3.0 s down, 2 failures",
    ]


# --------------------------------------------------------------- calls, against the queue
@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[JobQueue]:
    """The loopback queue, and the SDK's URLs pointed at it as its worker reads them at import."""
    queue = JobQueue()
    env = queue.env(query=QUERY)
    monkeypatch.setattr(rp_job, "JOB_GET_URL", env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", "test-worker"))
    done = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", "test-worker")
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", done)
    yield queue
    queue.close()


def call(coroutine_function, *args, **kwargs):
    async def main():
        async with aiohttp.ClientSession() as session:
            return await coroutine_function(session, *args, **kwargs)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("answer", "cause"),
    [
        (UNAVAILABLE, "HTTP 503"),
        (Answer(500, b"oops", "text/plain"), "HTTP 500"),
        (Answer(401, b'{"error": "unauthorized"}'), "HTTP 401"),
        (TOO_MANY, "HTTP 429"),
        (DEGRADED, "HTTP 200 without a job's id and input in it"),
        (Answer(200, b'[{"id": "a", "input": {}}, {"status": "degraded"}]'), "HTTP 200 without a job's"),
        (Answer(200, b'"ok"'), "HTTP 200 without a job's id and input in it"),
        (NOT_JSON, "HTTP 200 with a body that is not JSON (text/html)"),
    ],
)
def test_job_take_calls_a_faulty_answer_a_fault_and_names_its_cause(queue, answer, cause):
    queue.add(text_job(1))
    queue.fault = answer
    with pytest.raises(ApiFault) as raised:
        call(take_jobs, 1)
    assert raised.value.cause.startswith(cause)
    assert QUERY_SECRET not in str(raised.value)
    assert (raised.value.status == 429) is (answer is TOO_MANY)
    assert queue.backlog  # nothing was handed out


def test_job_take_reads_jobs_and_no_job_as_the_sdk_does(queue):
    queue.add(text_job(1), text_job(2), text_job(3))
    assert [job["id"] for job in call(take_jobs, 1)] == ["job-1"]
    assert [job["id"] for job in call(take_jobs, 5)] == ["job-2", "job-3"]  # the batch endpoint
    assert call(take_jobs, 1) == []  # 204
    for no_job in (Answer(200, b""), Answer(400, b"")):  # an empty 200; FlashBoot's 400
        queue.fault = no_job
        assert call(take_jobs, 1) == []
    queue.fault = DROPPED
    with pytest.raises(aiohttp.ServerDisconnectedError):
        call(take_jobs, 1)


def test_a_result_is_posted_until_it_is_stored(queue):
    queue.done_fault = UNAVAILABLE
    cleared = []

    async def clear_after(seconds: float) -> None:
        await asyncio.sleep(seconds)
        queue.done_fault = DROPPED
        await asyncio.sleep(seconds)
        queue.done_fault = None
        cleared.append(time.monotonic())

    async def main() -> bool:
        async with aiohttp.ClientSession() as session:
            clearing = asyncio.create_task(clear_after(2.0))
            stored = await send_result(session, {"output": {"n": 1}}, {"id": "job-1"})
            await clearing
            return stored

    assert asyncio.run(main()) is True
    assert queue.results["job-1"] == {"output": {"n": 1}}
    posts = queue.times("done")
    assert 5 <= len(posts) <= 12, len(posts)  # 0.25 s doubling, jittered, over 4 s
    assert queue.finished["job-1"] - cleared[0] < 5.0


def test_a_refused_result_is_not_retried_and_a_failing_one_not_forever(queue, caplog):
    caplog.set_level(logging.ERROR, "src.jobs.job_api")
    queue.done_fault = Answer(404, b'{"error": "no such job"}')
    assert call(send_result, {"output": {}}, {"id": "job-1"}) is False
    assert len(queue.times("done")) == 1
    queue.done_fault = UNAVAILABLE
    started = time.monotonic()
    assert call(send_result, {"output": {}}, {"id": "job-2"}, limit_s=2.0) is False
    assert 2.0 <= time.monotonic() - started < 5.0
    assert [record.getMessage() for record in caplog.records] == [
        "job job-1: result refused (HTTP 404); not retried",
        "job job-2: result dropped after 2 s of failed posts, the last: HTTP 503",
    ]
    assert "job-1" not in queue.results and "job-2" not in queue.results
    # A progress update is sent once: the next one supersedes it.
    assert call(send_result, {"status": "IN_PROGRESS", "output": {}}, {"id": "job-3"}) is False
    assert len(queue.times("progress")) == 1


# ------------------------------------------------------------ the deployed worker
@contextmanager
def deployed(queue: JobQueue, model: Path, log: Path) -> Iterator:
    env = worker_env(model, **queue.env(query=QUERY), RUNPOD_PING_INTERVAL="1000")
    process = deployed_worker(env, log)
    try:
        yield process
    finally:
        end_process(process, seconds=30)


def busiest_second(times: list[float]) -> int:
    """The most requests in any one-second window."""
    return max((sum(t <= u < t + 1.0 for u in times) for t in times), default=0)


def wait_for_request(queue: JobQueue, kind: str, since: float, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not queue.times(kind, since):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for_recovery(log: Path, calls: tuple[str, ...], seconds: float = 15.0) -> None:
    """Until each call has logged its answer after the outage: a call backing off waits up to
    5 s (at least 5 s after a 429) before it asks again, so a fixed sleep can end too soon."""
    deadline = time.monotonic() + seconds
    while not all(lines_with(f"{call} answering again after", log.read_text()) for call in calls):
        if time.monotonic() > deadline:
            return  # the assertions below name the call that did not recover
        time.sleep(0.2)


def back_off_before_success(requests: list[float], up: float, done_at: float) -> float:
    """How long the worker waited before the request that succeeded once the API answered again
    (`requests`: when each request of one call came, as the queue saw them), read from the queue's
    own records, not from the test's clock around the loaded worker.

    The request that succeeded (the last before `done_at`) must follow a failing one from before
    `up`: none wasted after recovery. Their gap is the worker's back-off (at most 5 s), so a job
    waiting in the queue starts, and a result is stored, within 6 s of the API answering again.
    """
    succeeded = max(t for t in requests if t <= done_at)
    before = [t for t in requests if t < succeeded]
    assert before and before[-1] < up, "a request after recovery was wasted"
    return succeeded - before[-1]


def lines_with(text: str, log: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def test_an_outage_of_the_job_api_is_ridden_out_quietly_and_loses_no_result(tiny_model, tmp_path):
    """503 for 12 s, then `200 {"status": "degraded"}` for 6 s, with a job running as it starts
    that finishes, and fails to post its result, while the API is down."""
    long_job = {**text_job(1, size="1024*1024", num_inference_steps=8), "id": "in-flight"}
    queue = JobQueue([text_job(0)])
    log = tmp_path / "worker.log"
    with deployed(queue, tiny_model, log):
        assert queue.wait_for(["job-0"], START_SECONDS), log.read_text()[-3000:]
        queue.add(long_job)
        assert queue.wait_for_progress("in-flight", 30), log.read_text()[-3000:]
        down, log_before = time.monotonic(), log.stat().st_size
        queue.fault = queue.done_fault = UNAVAILABLE
        time.sleep(1.0)
        queue.add(text_job(2))  # queued while the API is down
        time.sleep(11.0)
        queue.fault = DEGRADED
        time.sleep(6.0)
        # On a busy machine the running job may take longer: its result post must fail first.
        assert wait_for_request(queue, "done", down, 60), log.read_text()[-3000:]
        up = time.monotonic()
        queue.fault = queue.done_fault = None
        assert queue.wait_for(["in-flight", "job-2"], 60), log.read_text()[-3000:]
        wait_for_recovery(log, ("job-take", "stop-signal poll", "job-done post"))
        time.sleep(1.0)  # the heartbeat's next answer, if it failed at all
        text = log.read_text()
        logged = log.stat().st_size - log_before
    queue.close()

    # Back-off: after 5 s of outage, at most 2 job-take requests a second (the SDK: ~1,800).
    takes = queue.times("take", down, up)
    late = queue.times("take", takes[0] + 5.0, up)
    stops = queue.times("stop", down, up)
    print(
        f"\njob-take: {len(takes)} requests in the {up - down:.1f} s outage, {len(late)} after its first 5 s "
        f"({len(late) / (up - takes[0] - 5.0):.2f}/s), busiest second {busiest_second(late)}; "
        f"stop poll: {len(stops)}; pings: {len(queue.times('ping', down, up))}"
    )
    assert busiest_second(late) <= 2 and len(late) <= 2 * (up - takes[0] - 5.0)
    assert busiest_second(queue.times("stop", stops[0] + 5.0, up)) <= 2
    # Recovery: the job queued during the outage starts within 6 s of the API answering.
    recovery = back_off_before_success(queue.times("take"), up, queue.taken["job-2"])
    stored = back_off_before_success(queue.result_posts["in-flight"], up, queue.finished["in-flight"])
    print(f"job-2 taken after a {recovery:.2f} s back-off; in-flight result stored after {stored:.2f} s")
    assert recovery < 6.0
    # No result lost: the running job finished during the outage; its result was stored after it.
    assert 0 < stored < 6.0 and "error" not in queue.results["in-flight"]
    assert "error" not in queue.results["job-2"]
    # Quiet log: one line as each call's outage starts, one as it ends; no per-request line.
    print(f"log: {logged} bytes from the outage on:\n" + "\n".join(lines_with("src.jobs.job_api", text)))
    for call in ("job-take", "stop-signal poll", "job-done post"):
        assert len(lines_with(f"{call} failing: HTTP 503;", text)) == 1, call
        assert len(lines_with(f"{call} answering again after", text)) == 1, call
    assert len(lines_with("heartbeat failing:", text)) <= 1
    assert not lines_with("still failing", text)  # 18 s: no minute's summary yet
    assert not lines_with("Failed to", text) and not lines_with("Ping Request Error", text)
    assert logged < 4000
    assert QUERY_SECRET not in text and "Traceback" not in text


def test_garbled_answers_429s_and_dropped_connections_are_ridden_out_too(tiny_model, tmp_path):
    """Job-take answers HTML for 4 s, then 429 for 6 s, then hangs up for 6 s; job-done posts hang up."""
    long_job = {**text_job(1, size="1024*1024", num_inference_steps=8), "id": "in-flight"}
    queue = JobQueue([text_job(0)])
    log = tmp_path / "worker.log"
    with deployed(queue, tiny_model, log):
        assert queue.wait_for(["job-0"], START_SECONDS), log.read_text()[-3000:]
        queue.add(long_job)
        assert queue.wait_for_progress("in-flight", 30), log.read_text()[-3000:]
        down, log_before = time.monotonic(), log.stat().st_size
        queue.fault, queue.done_fault = NOT_JSON, DROPPED
        time.sleep(1.0)
        queue.add(text_job(2))
        time.sleep(3.0)
        queue.fault, too_many = TOO_MANY, time.monotonic()
        time.sleep(6.0)
        queue.fault, dropped = DROPPED, time.monotonic()
        time.sleep(6.0)
        assert wait_for_request(queue, "done", down, 60), log.read_text()[-3000:]
        up = time.monotonic()
        queue.fault = queue.done_fault = None
        assert queue.wait_for(["in-flight", "job-2"], 60), log.read_text()[-3000:]
        wait_for_recovery(log, ("job-take", "stop-signal poll", "job-done post", "heartbeat"))
        text = log.read_text()
        logged = log.stat().st_size - log_before
    queue.close()

    takes = queue.times("take", down)
    answered_429 = queue.times("take", too_many, dropped)
    after_429 = [min(t for t in takes if t > asked) for asked in answered_429]
    print(f"\njob-take: {len(queue.times('take', down, up))} requests in {up - down:.1f} s; after a 429:")
    print(", ".join(f"{b - a:.2f} s" for a, b in zip(answered_429, after_429, strict=True)))
    assert answered_429 and all(b - a >= 4.9 for a, b in zip(answered_429, after_429, strict=True))
    assert busiest_second(queue.times("take", queue.times("take", down)[0] + 5.0, up)) <= 2
    recovery = back_off_before_success(queue.times("take"), up, queue.taken["job-2"])
    stored = back_off_before_success(queue.result_posts["in-flight"], up, queue.finished["in-flight"])
    print(f"job-2 taken after a {recovery:.2f} s back-off; in-flight result stored after {stored:.2f} s")
    assert recovery < 6.0 and 0 < stored < 6.0
    assert "error" not in queue.results["in-flight"]

    print(f"log: {logged} bytes:\n" + "\n".join(lines_with("src.jobs.job_api", text)))
    not_json = "HTTP 200 with a body that is not JSON (text/html);"
    assert len(lines_with(f"job-take failing: {not_json}", text)) == 1
    assert len(lines_with(f"stop-signal poll failing: {not_json}", text)) == 1
    assert len(lines_with("job-done post failing: no answer (ServerDisconnectedError);", text)) == 1
    for call in ("job-take", "stop-signal poll", "job-done post", "heartbeat"):
        assert len(lines_with(f"{call} failing:", text)) == 1, call
        assert len(lines_with(f"{call} answering again after", text)) == 1, call
    assert not lines_with("Retrying", text) and not lines_with("Failed to", text)
    assert logged < 4000
    assert QUERY_SECRET not in text and "Traceback" not in text
