"""Servers that tests and benchmarks start on 127.0.0.1: an S3 store, a proxy in front of
it, and a stand-in for Runpod's job queue. Each serves only loopback and stops by itself
when closed; no request loop here is unbounded in time.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
from botocore.config import Config

from tests.conftest import ROOT, end_process, free_port, wait_for_http

KEY_ID = "AKIASTORAGETEST00001"
SECRET = "storage-test-secret-7Qz9vX2m"
BUCKET = "zimage-test"


# --------------------------------------------------------------------------- servers
class MotoServer:
    """moto's S3 server as a subprocess on a loopback port; `stop` and `start` keep the port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_http(f"{self.url}/moto-api/", self.process, seconds=30)
        except RuntimeError as err:
            self.stop()
            raise RuntimeError(f"moto server: {err}") from None

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process, seconds=10)

    def client(self, service: str = "s3", key_id: str = KEY_ID, secret: str = SECRET):
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}),
        )

    def make_bucket(self, name: str = BUCKET) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, prefix: str, bucket: str = BUCKET) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))


REQUEST_START = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE) /")


class StoreProxy:
    """A TCP proxy in front of the store that can slow, cut off or swallow requests.

    It records the head (request line and headers) of every request, and how many were
    waiting for their response at the same time.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.delay = 0.0  # seconds each response is held back
        self.puts_allowed: int | None = None  # later PUTs have their connection cut
        self.swallow = False  # read requests, never answer
        self.heads: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.swallow:
            with client:
                try:
                    while client.recv(65536):
                        pass
                except OSError:
                    pass
            return
        upstream = socket.create_connection(self.upstream)
        answered = threading.Event()
        threading.Thread(target=self._down, args=(upstream, client, answered), daemon=True).start()
        try:
            while data := client.recv(65536):
                if REQUEST_START.match(data):
                    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
                    with self.lock:
                        self.heads.append(head)
                        puts = sum(h.startswith("PUT ") for h in self.heads)
                        if (
                            head.startswith("PUT ")
                            and self.puts_allowed is not None
                            and puts > self.puts_allowed
                        ):
                            break
                        self.in_flight += 1
                        self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    answered.clear()
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _down(self, upstream: socket.socket, client: socket.socket, answered: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if not answered.is_set():
                    time.sleep(self.delay)
                    with self.lock:
                        self.in_flight -= 1
                    answered.set()
                client.sendall(data)
        except OSError:
            pass


@dataclass(frozen=True)
class Answer:
    """What a failing job API answers instead: a status and body, or a connection closed unanswered."""

    status: int = 503
    body: bytes = b""
    content_type: str = "application/json"
    drop: bool = False


UNAVAILABLE = Answer(503, b'{"error": "service unavailable"}')
DEGRADED = Answer(200, b'{"status": "degraded"}')  # a 200 with no job's id or input in it
NOT_JSON = Answer(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
TOO_MANY = Answer(429, b'{"error": "too many requests"}')
DROPPED = Answer(drop=True)

GET_KINDS = (("/job-take", "take"), ("/job-stop/", "stop"), ("/ping/", "ping"))


class JobQueue:
    """Runpod's job queue as runpod 1.12's worker loop speaks to it, on loopback.

    - GET  .../job-take/<worker>?...        one job as JSON, or 204 when the backlog is empty
    - GET  .../job-take-batch/<worker>?...&batch_size=N   a list of up to N jobs, or 204
    - GET  .../job-stop/<worker>?...        long-poll (at most `stop_poll` s): {"jobsToStop": [...]} or 204
    - POST .../job-done/<worker>/<job id>?...  an IN_PROGRESS update or the job's result
    - GET  .../ping/<worker>                 the heartbeat

    It records when each job was taken and finished, every progress update per job, every
    result, and when each request came (`requests`: time and kind: take, stop, ping,
    progress, done), so tests and the benchmark read the worker's behaviour from outside.
    Every ping's worker and query are kept too (`ping_queries`): an unfit worker's one report
    is a ping with status=unhealthy, the failed check's name and its reason.

    Faults: while `fault` is set, job-take, the stop channel and the heartbeat answer it
    instead (the API is down); while `done_fault` is set, job-done posts do.
    """

    stop_poll = 1.0

    def __init__(self, jobs: list[dict] | None = None) -> None:
        self.backlog: list[dict] = list(jobs or [])
        self.taken: dict[str, float] = {}
        self.results: dict[str, dict] = {}
        self.finished: dict[str, float] = {}
        self.progress: dict[str, list[dict]] = {}
        self.take_requests: list[str] = []
        self.pings = 0
        self.ping_queries: list[tuple[str, dict[str, str]]] = []  # (worker id, query)
        self.stops: list[str] = []
        self.requests: list[tuple[float, str]] = []
        self.result_posts: dict[str, list[float]] = {}  # per job, when each result post came
        self.fault: Answer | None = None
        self.done_fault: Answer | None = None
        self.lock = threading.Condition()
        queue = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path, query = urlsplit(self.path).path, parse_qs(urlsplit(self.path).query)
                kind = next((kind for marker, kind in GET_KINDS if marker in path), "")
                queue.requests.append((time.monotonic(), kind))
                if kind and queue.fault:
                    return self._fail(queue.fault)
                if "/job-take" in path:
                    queue.take_requests.append(self.path)
                    batch = "/job-take-batch/" in path
                    jobs = queue._take(int(query.get("batch_size", ["1"])[0]) if batch else 1)
                    if not jobs:
                        return self._answer(204)
                    return self._answer(200, jobs if batch else jobs[0])
                if "/job-stop/" in path:
                    stops = queue._wait_for_stops()
                    return self._answer(200, {"jobsToStop": stops}) if stops else self._answer(204)
                if "/ping/" in path:
                    with queue.lock:
                        queue.pings += 1
                        worker = path.rstrip("/").rsplit("/", 1)[-1]
                        queue.ping_queries.append((worker, {k: v[-1] for k, v in query.items()}))
                        queue.lock.notify_all()
                    return self._answer(200, {})
                self._answer(404)

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                progress = body.get("status") == "IN_PROGRESS"
                job_id = urlsplit(self.path).path.rstrip("/").rsplit("/", 1)[-1]
                queue.requests.append((now := time.monotonic(), "progress" if progress else "done"))
                if not progress:
                    queue.result_posts.setdefault(job_id, []).append(now)
                if queue.done_fault:
                    return self._fail(queue.done_fault)
                queue._record(job_id, body)
                self._answer(200, {})

            def _fail(self, fault: Answer) -> None:
                if fault.drop:
                    self.close_connection = True
                    return
                self.send_response(fault.status)
                self.send_header("Content-Type", fault.content_type)
                self.send_header("Content-Length", str(len(fault.body)))
                self.end_headers()
                self.wfile.write(fault.body)

            def _answer(self, status: int, payload: object = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def env(self, worker_id: str = "test-worker", query: str = "gpu=cpu") -> dict[str, str]:
        """The variables Runpod sets on a worker, pointed here; the SDK's internet checks off."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.url}/v2/job-take/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.url}/v2/job-done/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_PING": f"{self.url}/v2/ping/$RUNPOD_POD_ID",
            "RUNPOD_AI_API_KEY": "queue-test-key",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def add(self, *jobs: dict) -> None:
        with self.lock:
            self.backlog.extend(jobs)

    def stop(self, job_id: str) -> None:
        """Signal the worker to stop a job, as a platform cancel or an execution timeout does."""
        with self.lock:
            self.stops.append(job_id)
            self.lock.notify_all()

    def wait_for(self, job_ids: list[str], seconds: float) -> bool:
        """True once every one of `job_ids` has a result; False after `seconds`."""
        return self._wait_until(lambda: all(job_id in self.results for job_id in job_ids), seconds)

    def wait_for_progress(self, job_id: str, seconds: float) -> bool:
        return self._wait_until(lambda: bool(self.progress.get(job_id)), seconds)

    def wait_for_pings(self, count: int, seconds: float) -> bool:
        """True once the worker's heartbeat has reached this queue `count` times."""
        return self._wait_until(lambda: self.pings >= count, seconds)

    def _wait_until(self, done: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        with self.lock:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(timeout=left)
        return True

    def times(self, kind: str, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """When requests of one kind (take, stop, ping, progress, done) came, from `start` to `end`."""
        return [t for t, k in list(self.requests) if k == kind and start <= t < end]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _take(self, count: int) -> list[dict]:
        with self.lock:
            jobs, self.backlog = self.backlog[:count], self.backlog[count:]
            for job in jobs:
                self.taken[job["id"]] = time.monotonic()
            return jobs

    def _wait_for_stops(self) -> list[str]:
        with self.lock:
            if not self.stops:
                self.lock.wait(timeout=self.stop_poll)
            stops, self.stops = self.stops, []
            return stops

    def _record(self, job_id: str, body: dict) -> None:
        with self.lock:
            if body.get("status") == "IN_PROGRESS":
                self.progress.setdefault(job_id, []).append(body.get("output"))
            else:
                self.results[job_id] = body
                self.finished[job_id] = time.monotonic()
            self.lock.notify_all()


def deployed_worker(env: dict[str, str], log_path: Path, script: str = "handler.py") -> subprocess.Popen:
    """`python handler.py` with no flags, as the container runs it, logging to `log_path`."""
    return subprocess.Popen(
        [sys.executable, script],
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "wb"),  # noqa: SIM115 - the child holds it; closed when it exits
        stderr=subprocess.STDOUT,
    )


def wait_for_line(log_path: Path, text: str, seconds: float) -> bool:
    """True once the worker's log holds `text`; False after `seconds`."""
    deadline = time.monotonic() + seconds
    while text not in log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
