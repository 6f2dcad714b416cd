"""The process of a load-balancing worker: listen, load, serve, and on SIGTERM drain and exit 0.

The sockets are bound and listening before the weights load, so Runpod's health check sees 204
("initializing") from the first second, then 200 once `load` returns on its own thread (the GPU
thread still runs every torch op: `Worker.start` submits the loading to it). `/ping` has its
own server when PORT_HEALTH differs from PORT.

uvicorn's own signal handling closes the listening sockets at once and re-raises the signal
once it is done (the process then dies of SIGTERM, not exit 0). Here SIGTERM and SIGINT begin a
stop instead: /ping answers 503 and new requests 503 while the requests in flight finish and are
answered; only then are the servers told to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Generator

import uvicorn

from src.jobs.worker import Worker
from src.lb.app import State, build_app, openai_error, ping
from src.openai_images.routes import OpenAIImages
from src.runtime.settings import Settings

log = logging.getLogger(__name__)
HOST = "0.0.0.0"  # noqa: S104  # nosec B104: the contract listens on every interface; Runpod's gateway reaches the container from outside


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # signals begin the drain instead (the module's docstring)


class LoadBalancer:
    """One process's servers over one `State`; `run` returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Worker],
        expected: tuple[type[Exception], ...] = (),
        host: str = HOST,
    ) -> None:
        # `expected`: the load's failures that are a setup mistake, logged without a traceback.
        self.settings, self.load, self.expected = settings, load, expected
        self.state = State(settings.max_concurrency, settings.worker_api_key)
        ports = {settings.port: build_app(self.state)}
        if settings.port_health != settings.port:
            ports[settings.port_health] = _ping_only(self.state)
        self.servers = [
            _Server(
                uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None, lifespan="off")
            )
            for port, app in ports.items()
        ]
        self.stopped = asyncio.Event()
        self.failed = False

    async def run(self) -> int:
        sockets = [server.config.bind_socket() for server in self.servers]  # listening from here on
        serving = [
            asyncio.create_task(server.serve([sock]))
            for server, sock in zip(self.servers, sockets, strict=True)
        ]
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        loading = asyncio.create_task(self._load())
        stopped = asyncio.create_task(self.stopped.wait())
        await asyncio.wait([stopped, *serving], return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done():  # a server ended by itself: nothing to drain for
            log.error("a server ended unexpectedly; stopping")
            self.failed = True
            self.stop()
        await self.state.idle.wait()  # the requests in flight finish and are answered
        for server in self.servers:
            server.should_exit = True
        await asyncio.gather(*serving, return_exceptions=True)
        if not loading.done():
            log.info("stopped while the weights were still loading")
        return 1 if self.failed else 0

    def stop(self) -> None:
        """Begin the drain: /ping and new requests answer 503; `run` returns once in-flight ones end."""
        if not self.state.stopping:
            log.info("stopping: %d request(s) in flight are finished first", self.state.in_flight)
        self.state.stopping = True
        self.stopped.set()

    async def _load(self) -> None:
        log.info(
            "listening on port %d (/ping on %d); loading the model",
            self.settings.port,
            self.settings.port_health,
        )
        try:
            worker = await asyncio.to_thread(self.load)
        except Exception as err:  # either way this worker cannot serve
            log.error("cannot start: %s", err, exc_info=not isinstance(err, self.expected))
            self.failed = True
            self.stop()
            return
        self.state.images = OpenAIImages(worker)
        log.info("ready: serving requests")


def _ping_only(state: State) -> Callable:
    """The health port's app: /ping, and 404 for the rest."""

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/ping":
            answer = ping(state)
        else:
            answer = openai_error(
                404, "this port serves only GET /ping", "invalid_request_error", "not_found"
            )
        await answer(scope, receive, send)

    return app


def serve_http(
    settings: Settings, load: Callable[[], Worker], expected: tuple[type[Exception], ...] = ()
) -> int:
    """Run the load-balancing worker until it is stopped; its exit status."""
    return asyncio.run(LoadBalancer(settings, load, expected).run())
