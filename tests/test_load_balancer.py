"""The load-balancing endpoint's server (src/lb/), in this process over the tiny worker.

Real uvicorn servers on loopback, driven by the official openai SDK and by plain HTTP: its
replies must be the queue path's (the same pixels as /runsync for the same fields and seed), and
its limits hold: /ping through a load, the line of MAX_CONCURRENCY + 4 x that, 413, the key, a
client that leaves, the drain. Ordering is observed (the server's count of requests in flight,
a GPU held by the test), never slept for. tests/test_load_balancer_process.py runs handler.py.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from src.lb.limits import MAX_BODY
from tests.load_balancer import GpuHold, InProcessLB, post_in_background, wait_until
from tests.test_openai_images import (
    FAST,
    PROMPT,
    b64_pixels,
    check_generations_equal_native,
    check_masked_edit_keeps_the_opaque_pixels,
    half_mask_native,
    half_mask_rgba,
    payloads,
    picture,
    png_uri,
)

TINY = {"prompt": "a kite", "size": "256x256", "num_inference_steps": 1, "response_format": "b64_json"}


@pytest.fixture(scope="module")
def lb(worker) -> Iterator[InProcessLB]:
    """One server over the shared worker: one job running, four waiting."""
    server = InProcessLB(lambda: worker, max_concurrency=1)
    wait_until(lambda: requests.get(f"{server.url}/ping", timeout=5).status_code == 200, "ready")
    yield server
    assert server.close() == 0


def client_of(server: InProcessLB, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, **options)


def runsync(server: InProcessLB, job_input: object) -> dict:
    response = requests.post(f"{server.url}/runsync", json={"input": job_input}, timeout=120)
    reply = response.json()
    assert response.status_code == (200 if reply["status"] == "COMPLETED" else response.status_code)
    return reply


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------ the routes
def test_generations_are_runsync_s_pixels_in_b64_json_and_url(lb):
    client = client_of(lb)
    native = runsync(lb, {"prompt": PROMPT, "num_images": 2, "size": "256*256", **FAST})
    assert native["status"] == "COMPLETED" and native["id"]
    reply = client.images.generate(
        model="z-image-turbo", prompt=PROMPT, n=2, size="256x256", response_format="b64_json", extra_body=FAST
    )
    assert [entry.b64_json for entry in reply.data] == payloads(native["output"])
    linked = client.images.generate(
        prompt=PROMPT, n=2, size="256x256", response_format="url", extra_body=FAST
    )
    # No bucket: `url` is a data URI of the same bytes.
    assert [entry.url.split(",", 1)[1] for entry in linked.data] == payloads(native["output"])
    assert (linked.model_extra or {})["seed"] == FAST["seed"]


def test_the_queue_gateway_s_checks_hold_here_too(lb):
    # tests/test_openai_images.py's checks, with /runsync here as the native side.
    check_generations_equal_native(client_of(lb), lambda job_input: runsync(lb, job_input), n=1)
    check_masked_edit_keeps_the_opaque_pixels(client_of(lb), lambda job_input: runsync(lb, job_input))  # JSON


def test_multipart_edits_with_an_alpha_mask_equal_native_inpainting(lb):
    source = picture()
    reply = client_of(lb).images.edit(
        image=("in.png", png(source), "image/png"),
        mask=("mask.png", png(half_mask_rgba())),  # no content type: the SDK's default for bytes
        prompt=PROMPT,
        size="256x256",
        response_format="b64_json",
        extra_body={**FAST, "enable_safety_checker": False, "guidance_scale": 0.0},
    )
    out = b64_pixels(reply.data[0].b64_json)
    assert np.array_equal(out[:, 128:], np.asarray(source)[:, 128:])  # kept where opaque
    native = runsync(
        lb,
        {
            "prompt": PROMPT,
            "image": png_uri(source),
            "mask": png_uri(half_mask_native()),
            "size": "256*256",
            "strength": 1.0,
            "guidance_scale": 0.0,
            "enable_safety_checker": False,
            **FAST,
        },
    )
    assert [reply.data[0].b64_json] == payloads(native["output"])


def test_multipart_edits_outpaint_as_the_native_request_does(lb):
    # The SDK sends extra_body's fields as form text: `outpaint` as JSON, as `loras`.
    source = picture((256, 256))
    reply = client_of(lb).images.edit(
        image=("in.png", png(source), "image/png"),
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={**FAST, "outpaint": {"left": 64, "right": 64}},
    )
    native = runsync(
        lb, {"prompt": PROMPT, "image": png_uri(source), "outpaint": {"left": 64, "right": 64}, **FAST}
    )
    assert native["output"]["width"] == 384 and native["output"]["height"] == 256
    assert [reply.data[0].b64_json] == payloads(native["output"])
    assert np.array_equal(b64_pixels(reply.data[0].b64_json)[:, 64:320], np.asarray(source))  # kept


def test_form_fields_are_typed_and_wrong_ones_named(lb):
    files = {"image[]": ("in.png", png(picture((64, 64))), "image/png")}
    fields = {
        "prompt": "a",
        "n": "2",
        "size": "256x256",
        "num_inference_steps": "1",
        "response_format": "b64_json",
    }
    ok = requests.post(f"{lb.url}/v1/images/edits", files=files, data=fields, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    bad = requests.post(f"{lb.url}/v1/images/edits", files=files, data={**fields, "n": "two"}, timeout=60)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "n" and "'two'" in bad.json()["error"]["message"]
    two = {"image[]": [files["image[]"], files["image[]"]]}
    many = requests.post(f"{lb.url}/v1/images/edits", files=list(_items(two)), data=fields, timeout=60)
    assert many.status_code == 400 and "a list of 2 pictures" in many.json()["error"]["message"]


def _items(files: dict) -> Iterator[tuple[str, tuple]]:
    for name, value in files.items():
        for one in value:
            yield name, one


def test_models_list_and_native_errors(lb):
    assert [model.id for model in client_of(lb).models.list()] == ["z-image-turbo"]
    refused = requests.post(
        f"{lb.url}/runsync", json={"input": {"prompt": "a", "size": "1000*1000"}}, timeout=60
    )
    assert refused.status_code == 400
    assert refused.json()["status"] == "FAILED" and refused.json()["error"].startswith("size:")
    with pytest.raises(openai.BadRequestError) as caught:
        client_of(lb).images.generate(prompt="a", size="1000x1000")
    assert caught.value.body["param"] == "size"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/v1/images/generations", b"{not json", 400, "not valid JSON"),
        ("POST", "/runsync", b"[1, 2", 400, "not valid JSON"),
        ("POST", "/runsync", b'{"inputs": {}}', 400, "input: required"),
        ("POST", "/v1/images/edits", b"--x\r\nbroken", 400, "multipart"),  # no boundary given
        ("POST", "/v1/images/nope", b"{}", 404, "POST /v1/images/generations"),
        ("GET", "/v1/images/generations", b"", 405, "use POST"),
        ("POST", "/v1/models", b"{}", 405, "use GET"),
    ],
)
def test_malformed_requests_are_answered(lb, method, path, body, status, words):
    headers = {"Content-Type": "multipart/form-data" if "edits" in path else "application/json"}
    response = requests.request(method, f"{lb.url}{path}", data=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    reply = response.json()
    message = reply["error"]["message"] if isinstance(reply["error"], dict) else reply["error"]
    assert words in message


# ------------------------------------------------------------------ the limits
def test_a_body_over_30_mb_is_413_and_read_to_its_end(lb):
    big = b"x" * (MAX_BODY + 1)
    response = requests.post(f"{lb.url}/v1/images/generations", data=big, timeout=60)
    assert response.status_code == 413 and "30 MB" in response.json()["error"]["message"]
    chunked = requests.post(f"{lb.url}/runsync", data=iter([big[:MAX_BODY], b"yy"]), timeout=60)
    assert chunked.status_code == 413
    # Refusals before any route reads the body drain it too, so the client reads them.
    assert requests.post(f"{lb.url}/nope", data=big, timeout=60).status_code == 404
    assert requests.post(f"{lb.url}/v1/models", data=big, timeout=60).status_code == 405
    assert (
        runsync(lb, {"prompt": "after", "size": "256*256", "num_inference_steps": 1})["status"] == "COMPLETED"
    )


def test_past_running_and_waiting_places_429_in_arrival_order(lb, worker):
    answers: dict[int, requests.Response] = {}
    order: list[int] = []

    def send(i: int) -> None:
        answers[i] = requests.post(f"{lb.url}/v1/images/generations", json={**TINY, "seed": i}, timeout=120)
        order.append(i)

    with GpuHold(worker):
        senders = []
        for i in range(5):  # 1 running + 4 waiting
            senders.append(threading.Thread(target=send, args=(i,)))
            senders[-1].start()
            wait_until(lambda n=i + 1: lb.in_flight == n, f"{i + 1} requests in line")
        full = requests.post(f"{lb.url}/v1/images/generations", json=TINY, timeout=30)
        assert full.status_code == 429 and full.headers["Retry-After"].isdigit()
        assert (
            "full" in full.json()["error"]["message"]
            and full.json()["error"]["code"] == "rate_limit_exceeded"
        )
    for sender in senders:
        sender.join(timeout=120)
    assert [answers[i].status_code for i in range(5)] == [200] * 5
    assert order == list(range(5))  # first in, first answered


def test_a_client_that_leaves_frees_its_place_and_stops_its_job(lb, worker):
    body = json.dumps(TINY).encode()
    with GpuHold(worker):
        with socket.create_connection(("127.0.0.1", lb.settings.port)) as sock:
            sock.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: lb.in_flight == 1, "the job to wait for the GPU")
        # Freed while the GPU is still held: the job was stopped, not finished.
        wait_until(lambda: lb.in_flight == 0, "the place to free")
    ok = requests.post(f"{lb.url}/v1/images/generations", json=TINY, timeout=120)
    assert ok.status_code == 200


def test_a_client_that_leaves_while_waiting_in_line_frees_its_place(lb, worker):
    answers: list[requests.Response] = []
    body = json.dumps(TINY).encode()
    with GpuHold(worker):
        running = post_in_background(f"{lb.url}/v1/images/generations", TINY, answers)
        wait_until(lambda: lb.in_flight == 1, "the first request to run")
        with socket.create_connection(("127.0.0.1", lb.settings.port)) as sock:
            sock.sendall(
                b"POST /runsync HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {len(body) + 11}\r\n\r\n".encode()
                + b'{"input": '
                + body
                + b"}"
            )
            wait_until(lambda: lb.in_flight == 2, "the second to wait in line")
        wait_until(lambda: lb.in_flight == 1, "its place to free while the first still runs")
    running.join(timeout=120)
    assert [answer.status_code for answer in answers] == [200]


def test_ping_is_503_after_a_gpu_fault(lb, worker, monkeypatch):
    monkeypatch.setattr(worker.gpu, "faulted", True)
    assert requests.get(f"{lb.url}/ping", timeout=10).status_code == 503


# ------------------------------------------------------- load, key and stop
def test_ping_is_204_while_loading_then_200_on_its_own_port(worker):
    loaded = threading.Event()

    def load():
        assert loaded.wait(timeout=60)
        return worker

    server = InProcessLB(load, health_port=True)
    try:
        assert requests.get(f"{server.health_url}/ping", timeout=10).status_code == 204
        early = requests.post(f"{server.url}/v1/images/generations", json=TINY, timeout=10)
        assert early.status_code == 503 and early.headers["Retry-After"]
        loaded.set()
        wait_until(lambda: requests.get(f"{server.health_url}/ping", timeout=5).status_code == 200, "ready")
        assert requests.get(f"{server.health_url}/v1/models", timeout=10).status_code == 404
        assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 200
    finally:
        loaded.set()
        assert server.close() == 0


def test_the_key_guards_every_route_but_ping(worker, caplog):
    key = "sk-test-0123456789"
    server = InProcessLB(lambda: worker, worker_api_key=key)
    try:
        wait_until(lambda: requests.get(f"{server.url}/ping", timeout=5).status_code == 200, "ready")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            refused = requests.get(f"{server.url}/v1/models", headers=headers, timeout=10)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert key not in refused.text
        with pytest.raises(openai.AuthenticationError):
            client_of(server).models.list()
        assert requests.get(f"{server.url}/nope", timeout=10).status_code == 401  # routes are not shown
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        assert [model.id for model in client.models.list()] == ["z-image-turbo"]
    finally:
        assert server.close() == 0
    assert key not in caplog.text


def test_a_stop_answers_the_requests_in_flight_and_refuses_new_ones(worker):
    server = InProcessLB(lambda: worker, max_concurrency=1)
    answers: list[requests.Response] = []
    try:
        wait_until(lambda: requests.get(f"{server.url}/ping", timeout=5).status_code == 200, "ready")
        with GpuHold(worker):
            sender = post_in_background(f"{server.url}/v1/images/generations", TINY, answers)
            wait_until(lambda: server.in_flight == 1, "the job to wait for the GPU")
            server.stop()
            wait_until(lambda: server.server.state.stopping, "the stop")
            assert requests.get(f"{server.url}/ping", timeout=10).status_code == 503
            late = requests.post(f"{server.url}/v1/images/generations", json=TINY, timeout=10)
            assert late.status_code == 503 and "stopping" in late.json()["error"]["message"]
        sender.join(timeout=120)
        assert [answer.status_code for answer in answers] == [200]
    finally:
        assert server.close() == 0


def test_the_sdks_bracketed_objects_read_as_the_json_body_they_stand_for():
    import asyncio

    from openai._qs import Querystring
    from starlette.datastructures import Headers
    from urllib3 import encode_multipart_formdata

    from src.lb.forms import form_body

    fields = {
        "prompt": "a",
        "outpaint": {"left": 64, "feather": 8},
        "loras": [{"path": "a.safetensors", "scale": 0.5}, {"path": "b.safetensors"}],
        "enable_safety_checker": False,
    }
    items = Querystring().stringify_items(fields, array_format="brackets")  # as the SDK sends them
    body, content_type = encode_multipart_formdata([*items, ("image", ("in.png", b"\x89PNG"))])
    parsed = asyncio.run(form_body(Headers({"content-type": content_type}), body))
    assert parsed == {**fields, "image": "iVBORw=="}
