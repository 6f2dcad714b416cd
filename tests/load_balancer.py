"""The load-balancing server (src/lb/) in this process, on loopback ports, for tests.

It runs `LoadBalancer.run` on its own event loop in a thread, over a worker the test gives
(or a loader the test holds), exactly as `handler.py` runs it minus the signal handlers:
`stop()` is what SIGTERM calls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import requests

from src.jobs.worker import Worker
from src.lb.server import LoadBalancer
from src.runtime.settings import Settings
from tests.conftest import free_port


class InProcessLB:
    def __init__(self, load: Callable[[], Worker], health_port: bool = False, **settings: object) -> None:
        port = free_port()
        self.settings = replace(
            Settings(), port=port, port_health=free_port() if health_port else port, **settings
        )
        self.url = f"http://127.0.0.1:{port}"
        self.health_url = f"http://127.0.0.1:{self.settings.port_health}"
        self.server = LoadBalancer(self.settings, load, host="127.0.0.1")
        self.exit_code: int | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_until(lambda: _answers(f"{self.health_url}/ping"), "the server to listen")

    def _run(self) -> None:
        self.exit_code = self.loop.run_until_complete(self.server.run())

    @property
    def in_flight(self) -> int:
        return self.server.state.admission.in_flight

    def stop(self) -> None:
        """What SIGTERM does: begin the drain."""
        self.loop.call_soon_threadsafe(self.server.stop)

    def close(self, seconds: float = 60) -> int | None:
        self.stop()
        self.thread.join(timeout=seconds)
        return self.exit_code


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.ConnectionError:
        return False
    return True


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Poll `condition` (a state the test observes) until true; the sleep only bounds the polling."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {seconds:g} s for {what}")
        time.sleep(0.02)


class GpuHold:
    """Holds the worker's GPU thread, so every job waits for it (the real job flow, the GPU busy)."""

    def __init__(self, worker: Worker) -> None:
        self.release = threading.Event()
        held = threading.Event()

        def hold() -> None:
            held.set()
            self.release.wait(timeout=120)

        self.thread = threading.Thread(target=worker.gpu.call, args=(hold,), daemon=True)
        self.thread.start()
        held.wait(timeout=30)

    def __enter__(self) -> GpuHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.thread.join(timeout=30)


def post_in_background(url: str, body: dict, answers: list[requests.Response]) -> threading.Thread:
    """POST `body` as JSON from a started thread that appends the answer to `answers`."""
    sender = threading.Thread(target=lambda: answers.append(requests.post(url, json=body, timeout=300)))
    sender.start()
    return sender
