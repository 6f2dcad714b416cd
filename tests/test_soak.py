"""A bounded soak: hundreds of tiny jobs from concurrent clients through one local API worker.

Every job is answered as it should be, the worker's resident memory and open files stay flat
after a warm-up, and it leaves no temporary file behind. The worker runs with its own TMPDIR
so anything it writes through `tempfile` is seen; the Runpod SDK's downloader would write to
`jobs/` or `job_files/` under its working directory (the repo root), checked as well.

Run with `-s` to see the figures (they are printed for docs/reliability.md).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, data_uri_of, local_api, png_bytes, worker_env

CLIENTS = 4
WARM_UP_JOBS = 80  # past the prompt cache's 64 entries, so its memory is counted in the baseline
SOAK_JOBS = 320
# How long the soak takes is a figure it prints (about 22 s on 2 idle cores), not a check: beside
# another torch process on the same 2 cores it ran past the 600 s default timeout. It gets more.
TIMEOUT_S = 1800
# Measured: 0.3 to 6 MB over 1000 jobs. 20 MB over 320 jobs catches a leak of 0.06 MB a job, as
# 50 MB over 1000 did, in a third of the time.
RSS_GROWTH_LIMIT_MB = 20.0
FD_GROWTH_LIMIT = 0
SDK_SCRATCH = ("jobs", "job_files", "local_upload")

TINY = {"size": "256*256", "num_inference_steps": 1, "output_format": "jpeg"}
INPUT_IMAGE = data_uri_of(png_bytes((200, 150), (40, 90, 200)))


def job_for(i: int) -> tuple[str, dict, str]:
    """(endpoint, input, expected status): mostly text-to-image, some image-to-image, some bad
    requests and some /run + /status, each prompt different so the prompt cache keeps turning."""
    prompt = f"soak job {i}: a lighthouse on a cliff, storm number {i * 7919 % 1000}"
    if i % 25 == 0:
        return "runsync", {"prompt": prompt, **TINY, "num_images": 9}, "FAILED"
    if i % 10 == 0:
        return "runsync", {"prompt": prompt, **TINY, "image": INPUT_IMAGE, "strength": 0.5}, "COMPLETED"
    if i % 7 == 0:
        return "run", {"prompt": prompt, **TINY, "seed": i}, "COMPLETED"
    return "runsync", {"prompt": prompt, **TINY, "seed": i}, "COMPLETED"


_sessions = threading.local()
_opened: list[requests.Session] = []


def send(url: str, i: int) -> tuple[int, str, str]:
    """One job, as a client with a kept-alive connection would send it: (i, expected, got)."""
    session = getattr(_sessions, "session", None)
    if session is None:
        session = _sessions.session = requests.Session()
        _opened.append(session)
    endpoint, job_input, expected = job_for(i)
    reply = session.post(f"{url}/{endpoint}", json={"input": job_input}, timeout=120).json()
    if endpoint == "run":
        assert reply["status"] == "IN_PROGRESS", reply
        reply = session.post(f"{url}/status/{reply['id']}", timeout=120).json()
    if reply["status"] == "COMPLETED":
        assert reply["output"]["image_url"].startswith("data:image/jpeg;base64,"), str(reply)[:300]
    elif reply["status"] == "FAILED":
        assert reply["error"].startswith("num_images:"), reply
    return i, expected, reply["status"]


def run_jobs(url: str, numbers: range) -> list[tuple[int, str, str]]:
    """The clients' jobs; then they hang up, so their kept-alive connections are not counted as
    the worker's open files."""
    try:
        with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
            return list(pool.map(lambda i: send(url, i), numbers))
    finally:
        while _opened:
            _opened.pop().close()


def settled_open_files(pid: int, baseline: int | None = None, seconds: float = 5.0) -> list[str]:
    """The worker's open files once the connections the clients closed are closed on its side too."""
    deadline = time.monotonic() + seconds
    files = open_files(pid)
    while baseline is not None and len(files) > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
        files = open_files(pid)
    return files


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_files(pid: int) -> list[str]:
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except FileNotFoundError:
            pass  # closed while listing
    return links


def scratch_entries() -> set[Path]:
    return {p for name in SDK_SCRATCH if (ROOT / name).exists() for p in (ROOT / name).rglob("*")}


@pytest.mark.timeout(TIMEOUT_S)
def test_soak(tiny_model, tmp_path):
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()
    scratch_before = scratch_entries()
    env = worker_env(tiny_model, TMPDIR=str(worker_tmp))
    with local_api(env, tmp_path / "soak.log") as server:
        pid = server.process.pid

        warm = run_jobs(server.url, range(1, WARM_UP_JOBS + 1))
        assert all(expected == got for _, expected, got in warm), warm
        time.sleep(0.5)  # the server closes the warm-up clients' connections
        rss_before, files_before = rss_mb(pid), open_files(pid)

        started = time.monotonic()
        results = run_jobs(server.url, range(WARM_UP_JOBS + 1, WARM_UP_JOBS + SOAK_JOBS + 1))
        seconds = time.monotonic() - started
        rss_after, files_after = rss_mb(pid), settled_open_files(pid, len(files_before))

        wrong = [(i, expected, got) for i, expected, got in results if expected != got]
        completed = sum(got == "COMPLETED" for _, _, got in results)
        print(
            f"\nsoak: {len(results)} jobs ({completed} completed, {len(results) - completed} refused as "
            f"bad input) from {CLIENTS} clients in {seconds:.1f} s after {WARM_UP_JOBS} warm-up jobs; "
            f"RSS {rss_before:.0f} -> {rss_after:.0f} MB ({rss_after - rss_before:+.1f} MB); "
            f"open files {len(files_before)} -> {len(files_after)}"
        )
        assert server.process.poll() is None, "the worker died"
        assert not wrong, f"{len(wrong)} jobs answered wrongly, e.g. {wrong[:5]}"
        assert len(results) == SOAK_JOBS
        assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
        new = sorted(set(files_after) - set(files_before))
        assert len(files_after) - len(files_before) <= FD_GROWTH_LIMIT, new
        # Nothing open under its temporary folder, and no file opened during the soak and left
        # open after deletion (multiprocessing's /dev/shm arena from the imports is in both lists).
        new_files = set(files_after) - set(files_before)
        leaked = [f for f in files_after if f.startswith(str(worker_tmp))]
        leaked += [f for f in new_files if f.endswith("(deleted)")]
        assert not leaked, leaked
        log = server.log()
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]

    assert list(worker_tmp.iterdir()) == [], list(worker_tmp.iterdir())
    assert scratch_entries() == scratch_before
