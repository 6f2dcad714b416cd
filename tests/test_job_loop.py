"""The deployed path: `python handler.py` with no flags, in the Runpod SDK's job loop.

A loopback stand-in for Runpod's job queue (tests/loopback_servers.py) hands out jobs the
way runpod 1.12's worker takes them (job-take, batch take, the stop channel, result and
progress posts, heartbeats). The SDK's own start-up checks, which would reach a public
DNS server, are switched off with RUNPOD_SKIP_AUTO_SYSTEM_CHECKS and RUNPOD_SKIP_GPU_CHECK,
so nothing here leaves 127.0.0.1.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import Route, end_process, png_bytes, worker_env
from tests.fault_worker import FAULT_PROMPT
from tests.loopback_servers import (
    BUCKET,
    KEY_ID,
    SECRET,
    JobQueue,
    MotoServer,
    StoreProxy,
    deployed_worker,
    wait_for_line,
)

START_SECONDS = 120  # imports and the tiny model's load, on a busy 2-core machine


def text_job(i: int, **fields: object) -> dict:
    return {
        "id": f"job-{i}",
        "input": {"prompt": f"a harbour at dawn, take {i}", "size": "512*512", "seed": i, **fields},
    }


@contextmanager
def deployed(queue: JobQueue, model: Path, log: Path, script: str = "handler.py", **env: str) -> Iterator:
    process = deployed_worker(
        worker_env(model, **queue.env(), RUNPOD_PING_INTERVAL="1000", **env), log, script
    )
    try:
        yield process
    finally:
        end_process(process, seconds=30)


def backlog() -> list[dict]:
    # Different step counts, so each job's progress updates show whose they are.
    jobs = [text_job(i, num_inference_steps=1 + i % 3) for i in range(12)]
    jobs.insert(5, {"id": "bad", "input": {"prompt": "a", "size": "1000*1000"}})
    return jobs


def serve_backlog(tiny_model: Path, log: Path, concurrency: str) -> JobQueue:
    queue = JobQueue(backlog())
    ids = [job["id"] for job in queue.backlog]
    with deployed(queue, tiny_model, log, MAX_CONCURRENCY=concurrency):
        assert queue.wait_for(ids, START_SECONDS + 120), log.read_text()[-3000:]
        assert queue.wait_for_pings(1, 10), log.read_text()[-3000:]  # the 1 s heartbeat
    queue.close()
    return queue


def test_a_backlog_is_served_in_order_with_the_bytes_of_one_job_at_a_time(tiny_model, tmp_path):
    two = serve_backlog(tiny_model, tmp_path / "two.log", "2")
    one = serve_backlog(tiny_model, tmp_path / "one.log", "1")

    for queue in (one, two):
        assert queue.backlog == []
        assert queue.results["bad"]["error"].startswith("size: '1000*1000' is not allowed")
        for i in range(12):
            result = queue.results[f"job-{i}"]
            assert "error" not in result, result
            # The first step, at most two updates a second, and the last step.
            steps = 1 + i % 3
            sent = [p["step"] for p in queue.progress[f"job-{i}"]]  # each from its own SDK thread
            assert {1, steps} <= set(sent) and len(sent) == len(set(sent)), sent
            assert {p["steps"] for p in queue.progress[f"job-{i}"]} == {steps}
        assert queue.pings >= 1
        assert all("job_in_progress=" in url for url in queue.take_requests)

    strip = {"timings"}
    for job_id in one.results:
        a = {k: v for k, v in one.results[job_id].get("output", {}).items() if k not in strip}
        b = {k: v for k, v in two.results[job_id].get("output", {}).items() if k not in strip}
        assert a == b, job_id
    # Host memory stays bounded: never more jobs taken and unfinished than the slots plus as
    # many delivering (src/jobs/slots.py).
    for queue, slots in ((one, 1), (two, 2)):
        assert max(in_flight(queue, t) for t in queue.taken.values()) <= 2 * slots
    assert max(in_flight(two, t) for t in two.taken.values()) >= 2  # and both slots were used
    # With two slots the SDK asks for jobs two at a time; with one, singly.
    assert any("/job-take-batch/" in url for url in two.take_requests)
    assert not any("/job-take-batch/" in url for url in one.take_requests)


def test_delivering_jobs_free_slots_up_to_the_bound_and_wake_the_taking_loop():
    from src.jobs.slots import Delivery

    delivery = Delivery(bound=2)
    woken = []
    delivery.on_change(lambda: woken.append(delivery.jobs))
    with delivery.delivering(), delivery.delivering():
        assert delivery.freed() == 2
        with delivery.delivering():
            assert delivery.freed() == 2  # the third keeps its slot
    assert delivery.freed() == 0 and woken == [1, 2, 3, 2, 1, 0]
    try:
        with delivery.delivering():
            raise RuntimeError("an upload failed")
    except RuntimeError:
        pass
    assert delivery.jobs == 0


def test_progress_goes_out_for_the_first_step_then_at_most_twice_a_second_and_the_last(monkeypatch):
    import runpod.serverless

    from src.jobs import progress
    from src.jobs.progress import PROGRESS_EVERY_S, progress_reporter
    from src.runtime.settings import Settings

    # A step every 0.05 s on a clock the test moves, so a busy machine cannot change the count.
    now = [1000.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    sent: list[tuple[float, int]] = []
    monkeypatch.setattr(
        runpod.serverless,
        "progress_update",
        lambda job, update: sent.append((now[0], update["step"])),
    )
    report = progress_reporter({"id": "j"}, Settings(report_progress=True))
    for step in range(1, 31):
        report(step, 30)
        now[0] += 0.05
    steps = [step for _, step in sent]
    assert steps[0] == 1 and steps[-1] == 30 and 3 <= len(steps) <= 6, steps
    gaps = [b - a for (a, _), (b, _) in zip(sent[:-1], sent[1:-1], strict=False)]
    assert all(gap >= PROGRESS_EVERY_S for gap in gaps), gaps
    assert progress_reporter({"id": "j"}, Settings(report_progress=False)) is None


def in_flight(queue: JobQueue, moment: float) -> int:
    return sum(queue.taken[j] <= moment < queue.finished[j] for j in queue.taken)


def test_a_slow_image_host_does_not_hold_the_gpu(tiny_model, tmp_path, image_server):
    # The input image trickles until the test opens the gate: a text-to-image job must finish
    # meanwhile, through the other slot, or the gate never opens (whatever the machine's speed).
    gate = threading.Event()
    image_server.routes["/slow.png"] = Route(png_bytes((200, 150), (90, 20, 160)), gate=gate)
    queue = JobQueue(
        [
            {"id": "slow-i2i", "input": {**text_job(0)["input"], "image": f"{image_server.url}/slow.png"}},
            *[text_job(i) for i in range(1, 7)],
        ]
    )
    log = tmp_path / "worker.log"
    with deployed(queue, tiny_model, log, RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1"):
        try:
            # One job served while the image trickles proves the point; the download's 30 s
            # watchdog, counted from the worker's first take, bounds the wait.
            served = queue.wait_for(["job-1"], START_SECONDS + 20)
        finally:
            gate.set()
        assert served, log.read_text()[-3000:]
        assert "slow-i2i" not in queue.results  # still fetching while it ran
        assert queue.wait_for(["slow-i2i"] + [f"job-{i}" for i in range(4, 7)], 60), log.read_text()[-3000:]
    queue.close()
    assert "error" not in queue.results["slow-i2i"], queue.results["slow-i2i"]


def test_a_job_uploading_to_a_slow_store_gives_its_slot_to_the_next_job(tiny_model, tmp_path):
    """One slot and a store that holds each answer back 1.5 s: the next job is taken and run
    while the one before it uploads, and no more than one job uploads without a slot."""
    store = MotoServer()
    store.make_bucket()
    proxy = StoreProxy(store.port)
    proxy.delay = 1.5
    bucket = {
        "BUCKET_ENDPOINT_URL": proxy.url,
        "BUCKET_ACCESS_KEY_ID": KEY_ID,
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
        "BUCKET_NAME": BUCKET,
    }
    jobs = [text_job(i, size="256*256", num_inference_steps=1) for i in range(4)]
    queue = JobQueue(jobs)
    log = tmp_path / "worker.log"
    try:
        with deployed(queue, tiny_model, log, MAX_CONCURRENCY="1", **bucket):
            assert queue.wait_for([job["id"] for job in jobs], START_SECONDS + 90), log.read_text()[-3000:]
    finally:
        queue.close()
        proxy.close()
        store.stop()
    for job in jobs:
        assert queue.results[job["id"]]["output"]["image_url"].startswith(proxy.url), queue.results[job["id"]]
    overlaps = [in_flight(queue, t) for t in queue.taken.values()]
    assert max(overlaps) == 2, overlaps  # taken while the one before uploaded; never a third
    assert any(queue.taken[f"job-{i}"] < queue.finished[f"job-{i - 1}"] for i in range(1, 4))


def test_a_job_stopped_while_it_runs_frees_the_gpu_and_uploads_nothing(tiny_model, tmp_path):
    store = MotoServer()
    store.make_bucket()
    bucket = {
        "BUCKET_ENDPOINT_URL": store.url,
        "BUCKET_ACCESS_KEY_ID": KEY_ID,
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
        "BUCKET_NAME": BUCKET,
    }
    long_job = text_job(1, size="1024*1024", num_inference_steps=50)
    long_job["id"] = "long"
    queue = JobQueue([long_job, text_job(2)])
    log = tmp_path / "worker.log"
    try:
        with deployed(queue, tiny_model, log, **bucket):
            assert queue.wait_for_progress("long", START_SECONDS), log.read_text()[-3000:]
            queue.stop("long")
            stopped = time.monotonic()
            assert queue.wait_for(["job-2"], 60), log.read_text()[-3000:]
            took = queue.finished["job-2"] - stopped
            # The stop has run its course once the worker logs it: no result or upload after that.
            assert wait_for_line(log, "job long stopped by the platform", 30), log.read_text()[-3000:]
        # Its last step (always reported) never came, and no result: it stopped mid-denoise. How soon
        # after the signal is a figure, not a test (the stop poll, a step, and the next job's run).
        print(f"job-2 finished {took:.2f} s after the stop signal")
        assert "long" not in queue.results
        assert max(update["step"] for update in queue.progress["long"]) < 50
        assert "error" not in queue.results["job-2"]
        keys = store.keys("")
        assert keys and all(key.startswith("job-2/") for key in keys), keys
        assert "job long stopped by the platform" in log.read_text()
    finally:
        queue.close()
        store.stop()


def test_a_gpu_fault_asks_runpod_for_a_new_worker_and_takes_no_more_jobs(tiny_model, tmp_path):
    queue = JobQueue(
        [text_job(0), {"id": "fault", "input": {"prompt": FAULT_PROMPT, "size": "512*512"}}]
        + [text_job(i) for i in range(1, 6)]
    )
    log = tmp_path / "worker.log"
    with deployed(queue, tiny_model, log, "tests/fault_worker.py", MAX_CONCURRENCY="1") as process:
        assert queue.wait_for(["job-0", "fault"], START_SECONDS + 60), log.read_text()[-3000:]
        # The worker leaves by itself, after the job it was on, instead of failing every later job.
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    queue.close()
    assert "error" not in queue.results["job-0"]
    fault = queue.results["fault"]
    assert fault["stopPod"] is True
    assert fault["error"].startswith("GPU failure in job fault: this worker can no longer use its GPU")
    assert len(queue.backlog) == 5  # left in the queue for a healthy worker
    assert "Traceback" not in fault["error"] and "illegal memory access" in log.read_text()


def test_the_sdk_still_builds_its_scaler_where_the_worker_installs_its_own():
    """src/jobs/job_loop.py replaces `rp_scale.JobScaler` (its taking loop, stop poll and waits), the
    result post and the heartbeat where the SDK looks them up; a runpod upgrade that moves any
    of them fails here, not silently in production."""
    from runpod.serverless import worker as sdk_worker
    from runpod.serverless.modules import rp_http, rp_job, rp_ping, rp_progress, rp_scale

    assert "rp_scale.JobScaler(config)" in inspect.getsource(sdk_worker.run_worker)
    running = inspect.getsource(rp_scale.JobScaler.run)
    for loop in ("self.get_jobs(session)", "self.run_jobs(session)", "self.monitor_stop_signals(session)"):
        assert loop in running, loop
    taking = inspect.getsource(rp_scale.JobScaler.get_jobs)
    assert "await self.set_scale()" in taking and "self.job_progress.add(job)" in taking
    assert "jobs_queue.get()" in inspect.getsource(rp_scale.JobScaler.run_jobs)
    # The calls src/jobs/job_api.py makes build their URLs as the SDK's do, from these.
    assert list(inspect.signature(rp_job._job_get_url).parameters) == ["batch_size"]
    assert callable(rp_job._job_stop_url) and isinstance(rp_http.JOB_DONE_URL, str)
    # Results and progress are posted through the names `send_result` in rp_job and rp_progress.
    assert "from .rp_http import send_result" in inspect.getsource(rp_job)
    assert "await send_result(session, job_result, job" in inspect.getsource(rp_job.handle_job)
    assert "from .rp_http import send_result" in inspect.getsource(rp_progress)
    progress = inspect.getsource(rp_progress._async_progress_update)
    assert "await send_result(session, job_data, job)" in progress
    # The heartbeat process is started by the name `Heartbeat` in rp_ping and pings in `_send_ping`.
    assert "Process(target=Heartbeat.process_loop" in inspect.getsource(rp_ping.Heartbeat.start_ping)
    assert "self._send_ping()" in inspect.getsource(rp_ping.Heartbeat.ping_loop)
    heartbeat = inspect.getsource(rp_ping.Heartbeat.__init__)
    for name in ("self.PING_URL", "self.PING_INTERVAL", "self._session", "self._mirror"):
        assert name in heartbeat, name
