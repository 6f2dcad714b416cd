"""Shared fixtures: tiny real models, the worker in-process, and the worker as a local API.

Nothing here reaches the network: models are built from the real diffusers and
transformers classes with random weights, and every server listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# One OpenMP thread per torch process, set before torch is imported here and inherited by every
# worker a test starts: scripts/test.sh runs several test processes on two cores, and with torch's
# default (a thread per core in each) the processes and their workers oversubscribe the cores
# (measured with two: 267 s against 151 s for the same four files).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Files whose tests take longest go first (by their measured time), so that with several test
# processes (scripts/test.sh: pytest-xdist, a file to a process) no long file starts last and runs
# alone at the end. xdist keeps this order only with --no-loadscope-reorder: by default it hands
# out the files with the most tests first.
SLOW_FIRST = (
    "test_gpu_bench.py",
    "test_benchmark.py",
    "test_lora_compile.py",
    "test_job_loop.py",
    "test_locks.py",
    "test_job_api_faults.py",
    "test_readme.py",
    "test_local_api.py",
    "test_bad_input.py",
    "test_control_api.py",
    "test_load_balancer_process.py",
    "test_soak.py",
    "test_faults.py",
    "test_storage.py",
    "test_ship.py",
    "test_memory_plans.py",
    "test_security.py",
    "test_fitness.py",
    "test_two_models_deployed.py",
    "test_acceleration.py",
    "test_generation.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


# The cyclic GC paused while torch and diffusers import (as handler.py does): it would walk their
# half a million new objects again and again, about a fifth of the import time.
gc.disable()
from builder.tiny_model import build_tiny_safety_checker, build_tiny_zimage  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

gc.enable()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zimage(tmp_path_factory.mktemp("models") / "tiny-zimage")


@pytest.fixture(scope="session")
def never_flags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_safety_checker(tmp_path_factory.mktemp("checkers") / "never", nsfw_bias=-10.0)


@pytest.fixture(scope="session")
def worker(tiny_model: Path) -> Worker:
    """The real worker on the tiny model, checker off, data URIs (no bucket)."""
    return Worker.start(Settings(model=str(tiny_model), safety_checker_model="none"))


def handle_job(worker: Worker, job: dict) -> dict:
    """One job through the SDK's handler, `worker.handle`, outside any job loop."""
    return asyncio.run(worker.handle(job))


def run_input(worker: Worker, job_id: str, job_input: dict, on_step=None) -> dict:
    """`worker.run` for one input, raising what it raises (no error shape)."""
    return asyncio.run(worker.run(job_id, job_input, on_step))


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri_of(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_data_uri(uri: str) -> Image.Image:
    header, payload = uri.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- HTTP
class Route:
    """What the test image server answers on one path."""

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        headers: dict | None = None,
        delay: float = 0.0,
        length: bool = True,
        gate: threading.Event | None = None,
    ):
        self.body, self.status, self.headers, self.delay = body, status, headers or {}, delay
        self.length = length  # False: no Content-Length, the body runs until the connection closes
        # Set: a byte a second (never silent long enough for a read timeout) until the test
        # opens the gate, then the rest, so a test decides when the download ends.
        self.gate = gate


class ImageServer:
    """A real HTTP server on loopback whose routes the tests set; it records requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.received: list[tuple[str, str, bytes]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.received.append(("GET", self.path, b""))
                route = server.routes.get(self.path, Route(b"not found", 404))
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                if route.length and "Content-Length" not in route.headers:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                if route.gate is not None:
                    sent = 0
                    while not route.gate.wait(timeout=1.0) and sent < len(route.body) - 1:
                        self.wfile.write(route.body[sent : sent + 1])
                        self.wfile.flush()
                        sent += 1
                    self.wfile.write(route.body[sent:])
                elif route.delay:
                    # Trickle the body so a slow host is slow for the whole download.
                    for i in range(0, len(route.body), 1024):
                        time.sleep(route.delay)
                        self.wfile.write(route.body[i : i + 1024])
                        self.wfile.flush()
                else:
                    self.wfile.write(route.body)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                server.received.append(("POST", self.path, self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture
def allow_loopback_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own switch: the test server lives on 127.0.0.1, which is refused by default."""
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")


# ---------------------------------------------------------------------- local API
def worker_env(model: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("BUCKET_", "RUNPOD_", "ZIMAGE_", "SAFETY_"))
    }
    env.update(ZIMAGE_MODEL=str(model), SAFETY_CHECKER_MODEL="none", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def end_process(process: subprocess.Popen, seconds: float = 20) -> None:
    """SIGTERM, as Runpod stops a worker; SIGKILL if it has not gone after `seconds`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def wait_for_http(url: str, process: subprocess.Popen, seconds: float) -> None:
    """Poll `url` until it answers; RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"did not come up in {seconds:g} s")


def failed_start(model: Path, port: int | None = None) -> str:
    """`python handler.py --rp_serve_api` as deployed, on a model that must stop it: its output."""
    done = subprocess.run(
        serve_api_command(port or free_port()),
        cwd=ROOT,
        env=worker_env(model),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    return output


def serve_api_command(port: int) -> list[str]:
    """`python handler.py --rp_serve_api` on a loopback port, as docs/running-locally.md runs it."""
    return [
        sys.executable,
        "handler.py",
        "--rp_serve_api",
        "--rp_api_host",
        "127.0.0.1",
        "--rp_api_port",
        str(port),
    ]


class LocalAPI:
    """`handler.py` as a subprocess on a free loopback port, logging to `log_path`.

    By default `python handler.py --rp_serve_api` (the SDK's local API), ready once its `/docs`
    answers. `command` runs another form on the port it is given (the load-balancing server, told
    its `port` through `env`), and `ready=None` leaves waiting to the caller.
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        command: Callable[[int], list[str]] | None = None,
        ready: str | None = "/docs",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log_file = open(log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            (command or serve_api_command)(self.port),
            cwd=ROOT,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        if ready is None:
            return
        try:
            wait_for_http(f"{self.url}{ready}", self.process, seconds=120)
        except RuntimeError as err:
            self.close()
            raise RuntimeError(f"worker: {err}:\n{self.log()}") from None

    def runsync(self, job_input: object, timeout: float = 120) -> dict:
        response = requests.post(f"{self.url}/runsync", json={"input": job_input}, timeout=timeout)
        assert response.status_code == 200, response.text[:500]
        return response.json()

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def settled_log(self, seconds: float = 30) -> str:
        """The log once every earlier job's lines are in it: a marker job (refused, naming its
        unknown field) is sent last, and the log is read when its line has been written."""
        marker = f"log_marker_{secrets.token_hex(6)}"
        assert self.runsync({"prompt": "marker", marker: 1})["status"] == "FAILED"
        deadline = time.monotonic() + seconds
        while marker not in (log := self.log()):
            assert time.monotonic() < deadline, f"the marker job's line never came:\n{log[-3000:]}"
            time.sleep(0.05)
        return log

    def close(self, seconds: float = 20) -> int:
        """SIGTERM (SIGKILL after `seconds`); the exit status."""
        end_process(self.process, seconds)
        self.log_file.close()
        return self.process.returncode


@contextmanager
def local_api(env: dict[str, str], log_path: Path) -> Iterator[LocalAPI]:
    api = LocalAPI(env, log_path)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def api(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAPI]:
    """One shared local API on the tiny model: checker off, no bucket, production SSRF rules.

    It keeps the SDK's refusal of private addresses on, so a hostile URL in a test is
    refused before any connection; tests that fetch from the loopback image server start
    their own worker with RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1 and never send other hosts.
    """
    env = worker_env(tiny_model)
    with local_api(env, tmp_path_factory.mktemp("logs") / "api.log") as server:
        yield server
