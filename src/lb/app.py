"""The load-balancing endpoint's routes: HTTP in, the same job flow as the queue, HTTP out (API.md,
"Load-balancing endpoints").

`/v1/images/*` and `/v1/models` go through the OpenAI adapter exactly as a queued `openai_route`
job does (src/openai_images/routes.py), and `/runsync` through the native handler; only the
envelope differs. Before a route runs, `Guard` answers `/ping`, refuses everything once a stop has
begun, checks WORKER_API_KEY and counts the requests in flight so a stop can wait for them.

A client that goes away while its job waits or runs cancels the job, the queue mode's stop: the
GPU work ends at its next step and the place in line is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from src.lb.forms import BadForm, form_body, is_form
from src.lb.limits import (
    MAX_BODY,
    MAX_BODY_TEXT,
    WAITING_PER_SLOT,
    Admission,
    Disconnected,
    Full,
    TooLarge,
    read_body,
)
from src.openai_images.replies import error_object
from src.openai_images.routes import MODELS_ROUTE, OpenAIImages
from src.request.parse import parse_request
from src.runtime.errors import JobError

log = logging.getLogger(__name__)
ROUTES = {
    "/v1/images/generations": "POST",
    "/v1/images/edits": "POST",
    MODELS_ROUTE: "GET",
    "/runsync": "POST",
    "/ping": "GET",
}
RETRY_AFTER_S = 2  # about one job on a GPU: by then a place has likely freed


@dataclass
class State:
    """What every request may read: the worker once it is loaded, and whether a stop has begun."""

    running: int  # MAX_CONCURRENCY
    api_key: str | None = None
    images: OpenAIImages | None = None  # None while the weights load
    stopping: bool = False
    in_flight: int = 0  # requests past the guard, /ping aside
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.running, WAITING_PER_SLOT * self.running)
        self.idle.set()

    def health(self) -> int:
        """/ping's status: 204 loading, 200 ready, 503 faulted or stopping."""
        if self.stopping or (self.images is not None and self.images.worker.gpu.faulted):
            return 503
        return 204 if self.images is None else 200


def openai_error(
    status: int, message: str, kind: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """OpenAI's error shape, for the server's own refusals (a job's errors come from the adapter)."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status, headers=headers)


async def drain(receive: Receive) -> None:
    """Read and drop a body this server will not use, so the client reads the answer (src/lb/limits.py)."""
    with contextlib.suppress(TooLarge, Disconnected):
        await read_body(receive, cap=0)


class Guard:
    """Runs before every route: /ping, the stop, the key, the count of requests in flight."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan or websocket here
        state = self.state
        if scope["path"] == "/ping" and scope["method"] in ("GET", "HEAD"):
            await ping(state)(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await drain(receive)
            await refusal(scope, receive, send)
            return
        state.in_flight += 1
        state.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            if state.in_flight == 0:
                state.idle.set()

    def _refusal(self, scope: Scope) -> Response | None:
        if self.state.stopping:
            return openai_error(503, "this worker is stopping: send the request again", "server_error")
        key = self.state.api_key
        if key is None:
            return None
        sent = Request(scope).headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            what = "a wrong API key" if sent else "no Authorization header"
            return openai_error(
                401,
                f"this worker needs 'Authorization: Bearer <WORKER_API_KEY>'; the request had {what}",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None


def ping(state: State) -> Response:
    status = state.health()
    if status == 204:
        return Response(status_code=204)
    return JSONResponse({"status": "healthy" if status == 200 else "unhealthy"}, status)


def build_app(state: State) -> ASGIApp:
    """The server's ASGI app over `state`."""

    async def models(request: Request) -> Response:
        if state.images is None:
            return _loading()
        return JSONResponse(await state.images.handle({"input": {"openai_route": MODELS_ROUTE}}))

    async def openai(request: Request) -> Response:
        return await _job(request, state, _openai_job)

    async def runsync(request: Request) -> Response:
        return await _job(request, state, _native_job)

    async def not_found(request: Request, exc: Exception) -> Response:
        await drain(request.receive)  # no route read the body
        served = ", ".join(f"{method} {path}" for path, method in ROUTES.items())
        if isinstance(exc, HTTPException) and exc.status_code == 405:
            allowed = ROUTES.get(request.url.path, "")
            message = f"{request.method} {request.url.path[:100]}: method not allowed; use {allowed}"
            return openai_error(405, message, "invalid_request_error", headers={"Allow": allowed})
        message = f"{request.method} {request.url.path[:100]}: no such route; this worker serves {served}"
        return openai_error(404, message, "invalid_request_error", "not_found")

    routes = [
        Route("/v1/images/generations", openai, methods=["POST"]),
        Route("/v1/images/edits", openai, methods=["POST"]),
        Route(MODELS_ROUTE, models, methods=["GET"]),
        Route("/runsync", runsync, methods=["POST"]),
        Route("/ping", lambda request: ping(state), methods=["GET"]),  # Guard answers it; here for 405
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    return Guard(app, state)


def _loading() -> Response:
    message = "this worker is still loading its model: send the request again once GET /ping answers 200"
    return openai_error(503, message, "server_error", headers={"Retry-After": str(RETRY_AFTER_S)})


Job = Callable[[Request, OpenAIImages, bytes], Awaitable[Response]]


async def _job(request: Request, state: State, job: Job) -> Response:
    """A place in line (or 429), the capped body (or 413), then `job` once a running place frees."""
    images = state.images
    if images is None:
        await drain(request.receive)
        return _loading()
    try:
        state.admission.enter()
    except Full:
        await drain(request.receive)
        message = (
            f"this worker is full: {state.admission.running} requests running and "
            f"{state.admission.waiting} waiting; send it again after Retry-After seconds"
        )
        return openai_error(
            429,
            message,
            "rate_limit_error",
            "rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    async def when_its_turn_comes(body: bytes) -> Response:
        async with state.admission.slot():
            return await job(request, images, body)

    try:
        body = await read_body(request.receive)
        # A client that leaves while its request waits or runs frees its place at once.
        answer = await _unless_gone(request, when_its_turn_comes(body))
        return answer if answer is not None else Response(status_code=499)  # nobody reads it
    except TooLarge:
        message = (
            f"the request body is over {MAX_BODY_TEXT} ({MAX_BODY} bytes), the cap of this endpoint type"
        )
        return openai_error(413, message, "invalid_request_error", "request_too_large")
    except Disconnected:
        return Response(status_code=400)  # nobody reads it
    except Exception:  # a bug here must cost one request, never the server
        log.exception("%s: unexpected error", request.url.path)
        message = "internal error; the worker logged the details and keeps serving"
        return openai_error(500, message, "server_error")
    finally:
        state.admission.leave()


class BadJson(Exception):
    """A body that is not JSON; the message says where it broke."""


def _parsed(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as err:
        raise BadJson(f"the request body is not valid JSON ({str(err)[:120]}): send a JSON object") from None


async def _openai_job(request: Request, images: OpenAIImages, body: bytes) -> Response:
    route = request.url.path
    try:
        if route == "/v1/images/edits" and is_form(request.headers.get("content-type", "")):
            fields = await form_body(request.headers, body)
        else:
            fields = _parsed(body)
    except (BadForm, BadJson) as err:
        return openai_error(400, str(err), "invalid_request_error")
    reply = await images.handle({"id": _job_id(), "input": {"openai_route": route, "openai_input": fields}})
    if "error" in reply:
        return JSONResponse({"error": reply["error"]}, _failed_status(reply["error"]))
    return JSONResponse(reply)


async def _native_job(request: Request, images: OpenAIImages, body: bytes) -> Response:
    job_id = _job_id()
    try:
        raw = _parsed(body)
        if not (isinstance(raw, dict) and "input" in raw):
            raise BadJson('input: required: the body must be a JSON object {"input": {...}}')
    except BadJson as err:
        return JSONResponse({"id": job_id, "status": "FAILED", "error": str(err)}, 400)
    # Runpod's per-job bucket travels beside `input`, as the queue hands it over (src/jobs/worker.py).
    carried = {"s3Config": raw["s3Config"]} if raw.get("s3Config") is not None else {}
    output = await images.handle({"id": job_id, "input": raw["input"], **carried})
    if "error" in output:
        error = output["error"]
        status = _native_status(raw["input"], error)
        return JSONResponse({"id": job_id, "status": "FAILED", "error": error}, status)
    return JSONResponse({"id": job_id, "status": "COMPLETED", "output": output})


def _job_id() -> str:
    return f"lb-{uuid.uuid4()}"


def _native_status(job_input: Any, error: str | dict[str, Any]) -> int:
    """A failed native job: 400 when the input itself is unreadable (any key, however named, is
    then the caller's), else as the OpenAI adapter reads the message."""
    if isinstance(error, str):
        try:
            parse_request(job_input)
        except JobError:
            return 400
    return _failed_status(error)


def _failed_status(error: str | dict[str, Any]) -> int:
    """400 for the caller's mistakes (the OpenAI adapter's reading of the message), else 500."""
    kind = (error if isinstance(error, dict) else error_object(str(error)))["type"]
    return 400 if kind == "invalid_request_error" else 500


async def _unless_gone(request: Request, work: Awaitable[Response]) -> Response | None:
    """`work`'s result, or None when the client disconnects first (the job is then stopped)."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            log.info("the client left: stopping its job")
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    return None if job.cancelled() else job.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
