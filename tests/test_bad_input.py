"""A battery of malformed requests through the local API: each fails cleanly, the worker stays up.

Every case goes through `python handler.py --rp_serve_api` over HTTP, as a caller would send
it, and must come back `FAILED` within 60 s with a message that starts with the field at
fault and carries no traceback. After the battery the same process must still be alive and
serve a good job.

Network safety: the shared `api` worker keeps the SDK's SSRF protection on, so the private
and metadata URLs below are refused before any connection is opened; every host in them is
an IP literal or `localhost`, so not even a DNS query leaves the machine. The second worker
here (`loopback_api`) has `RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1` and is only ever sent URLs
of the loopback image server started in this module.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import (
    ImageServer,
    LocalAPI,
    Route,
    data_uri_of,
    decode_data_uri,
    free_port,
    local_api,
    png_bytes,
    worker_env,
)

ANSWER_WITHIN = 60.0  # seconds; the slowest case (the 30 s download cap) stays well inside it
GOOD = {"prompt": "a lighthouse", "size": "256*256", "num_inference_steps": 1, "output_format": "jpeg"}


# --------------------------------------------------------------------------- payloads
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A real decompression bomb: a valid greyscale PNG of width x height zeros, about 400 KB."""
    packer = zlib.compressobj(9)
    rows = (b"\x00" * (width + 1)) * 250  # filter byte + a row of zeros, 250 rows at a time
    body = b"".join(packer.compress(rows) for _ in range(height // 250)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def gif_bomb(side: int = 65535) -> bytes:
    """A GIF whose header claims side x side pixels (4.3 gigapixels) in a few dozen bytes."""
    screen = struct.pack("<HHBBB", side, side, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, side, side, 0)
    return b"GIF89a" + screen + frame + b"\x02\x02\x44\x01\x00;"


def _jpeg(size: tuple[int, int] = (128, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 50).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg()
PNG_BOMB = png_bomb()
PNG = png_bytes((300, 200))
SVG = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><svg>&e;</svg>'
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
HTML = b"<!doctype html><html><body><script>alert(1)</script></body></html>"
ZIP = b"PK\x05\x06" + b"\x00" * 18  # an empty zip archive
B64 = base64.b64encode


def img(**fields: object) -> dict:
    """A request that is fine except for the fields given (image-to-image at the smallest size)."""
    return {"prompt": "make it blue", "size": "256*256", "num_inference_steps": 1, **fields}


def wider(**outpaint: object) -> dict:
    """An outpainting request with the given `outpaint` (its size is the canvas's: no `size`)."""
    return {
        "prompt": "make it wider",
        "image": data_uri_of(PNG),
        "num_inference_steps": 1,
        "outpaint": outpaint,
    }


# (case id, the job's input, the field its error must start with)
BATTERY: list[tuple[str, object, str]] = [
    # prompt: missing, empty, wrong types, too long
    ("no-fields", {}, "prompt"),
    ("prompt-missing", {"size": "256*256"}, "prompt"),
    ("prompt-empty", {"prompt": ""}, "prompt"),
    ("prompt-blank", {"prompt": " \n\t\u3000 "}, "prompt"),
    ("prompt-null", {"prompt": None}, "prompt"),
    ("prompt-number", {"prompt": 123}, "prompt"),
    ("prompt-bool", {"prompt": True}, "prompt"),
    ("prompt-list", {"prompt": ["a", "b"]}, "prompt"),
    ("prompt-object", {"prompt": {"text": "a"}}, "prompt"),
    ("prompt-4001", {"prompt": "a" * 4001}, "prompt"),
    ("prompt-5MB", {"prompt": "a" * 5_000_000}, "prompt"),
    # size
    ("size-not-16", {"prompt": "a", "size": "1000*1000"}, "size"),
    ("size-empty", {"prompt": "a", "size": ""}, "size"),
    ("size-one-side", {"prompt": "a", "size": "1024"}, "size"),
    ("size-words", {"prompt": "a", "size": "big"}, "size"),
    ("size-number", {"prompt": "a", "size": 1024}, "size"),
    ("size-null", {"prompt": "a", "size": None}, "size"),
    ("size-too-small", {"prompt": "a", "size": "128*128"}, "size"),
    ("size-too-big", {"prompt": "a", "size": "4096*4096"}, "size"),
    ("size-negative", {"prompt": "a", "size": "-512*512"}, "size"),
    ("size-three-sides", {"prompt": "a", "size": "512*512*512"}, "size"),
    ("size-list", {"prompt": "a", "size": [512, 512]}, "size"),
    # strength
    ("strength-without-image", {"prompt": "a", "strength": 0.5}, "strength"),
    ("strength-over-1", img(image=data_uri_of(PNG), strength=1.5), "strength"),
    ("strength-negative", img(image=data_uri_of(PNG), strength=-0.1), "strength"),
    ("strength-string", img(image=data_uri_of(PNG), strength="0.5"), "strength"),
    ("strength-bool", img(image=data_uri_of(PNG), strength=True), "strength"),
    # seed
    ("seed-below-minus-1", {"prompt": "a", "seed": -2}, "seed"),
    ("seed-2^32", {"prompt": "a", "seed": 2**32}, "seed"),
    ("seed-10^30", {"prompt": "a", "seed": 10**30}, "seed"),
    ("seed-float", {"prompt": "a", "seed": 1.5}, "seed"),
    ("seed-whole-float", {"prompt": "a", "seed": 42.0}, "seed"),
    ("seed-string", {"prompt": "a", "seed": "42"}, "seed"),
    ("seed-bool", {"prompt": "a", "seed": True}, "seed"),
    # output_format and output_quality
    ("format-gif", {"prompt": "a", "output_format": "gif"}, "output_format"),
    ("format-empty", {"prompt": "a", "output_format": ""}, "output_format"),
    ("format-number", {"prompt": "a", "output_format": 1}, "output_format"),
    ("format-null", {"prompt": "a", "output_format": None}, "output_format"),
    ("quality-0", {"prompt": "a", "output_quality": 0}, "output_quality"),
    ("quality-101", {"prompt": "a", "output_quality": 101}, "output_quality"),
    ("quality-float", {"prompt": "a", "output_quality": 95.5}, "output_quality"),
    ("quality-string", {"prompt": "a", "output_quality": "95"}, "output_quality"),
    # enable_safety_checker: a real boolean only
    ("checker-string-false", {"prompt": "a", "enable_safety_checker": "false"}, "enable_safety_checker"),
    ("checker-string-true", {"prompt": "a", "enable_safety_checker": "true"}, "enable_safety_checker"),
    ("checker-0", {"prompt": "a", "enable_safety_checker": 0}, "enable_safety_checker"),
    ("checker-null", {"prompt": "a", "enable_safety_checker": None}, "enable_safety_checker"),
    # num_images
    ("images-0", {"prompt": "a", "num_images": 0}, "num_images"),
    ("images-5", {"prompt": "a", "num_images": 5}, "num_images"),
    ("images-negative", {"prompt": "a", "num_images": -1}, "num_images"),
    ("images-string", {"prompt": "a", "num_images": "2"}, "num_images"),
    ("images-float", {"prompt": "a", "num_images": 2.0}, "num_images"),
    ("images-bool", {"prompt": "a", "num_images": True}, "num_images"),
    # num_inference_steps
    ("steps-0", {"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
    ("steps-51", {"prompt": "a", "num_inference_steps": 51}, "num_inference_steps"),
    ("steps-float", {"prompt": "a", "num_inference_steps": 1.5}, "num_inference_steps"),
    ("steps-bool", {"prompt": "a", "num_inference_steps": False}, "num_inference_steps"),
    ("steps-string", {"prompt": "a", "num_inference_steps": "8"}, "num_inference_steps"),
    # guidance_scale (NaN and Infinity are what Python's json writes for them; FastAPI reads them)
    ("guidance-negative", {"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
    ("guidance-over-20", {"prompt": "a", "guidance_scale": 20.5}, "guidance_scale"),
    ("guidance-string", {"prompt": "a", "guidance_scale": "1"}, "guidance_scale"),
    ("guidance-bool", {"prompt": "a", "guidance_scale": True}, "guidance_scale"),
    ("guidance-nan", {"prompt": "a", "guidance_scale": float("nan")}, "guidance_scale"),
    ("guidance-infinity", {"prompt": "a", "guidance_scale": float("inf")}, "guidance_scale"),
    # negative_prompt
    ("negative-number", {"prompt": "a", "negative_prompt": 123}, "negative_prompt"),
    ("negative-4001", {"prompt": "a", "negative_prompt": "b" * 4001}, "negative_prompt"),
    # unknown fields (the error names the field and the nearest valid one)
    ("unknown-typo", {"prompt": "a", "sedd": 5}, "sedd"),
    ("unknown-width", {"prompt": "a", "width": 512}, "width"),
    ("unknown-steps", {"prompt": "a", "steps": 4}, "steps"),
    ("unknown-proto", {"prompt": "a", "__proto__": {"admin": True}}, "__proto__"),
    ("unknown-10000-keys", {"prompt": "a", **{f"k{i}": i for i in range(10_000)}}, "k0"),
    # outpaint: its keys and values named inside it, and the fields it cannot go with
    ("outpaint-no-image", {"prompt": "a", "outpaint": {"left": 64}}, "outpaint"),
    ("outpaint-negative", wider(left=-64), "outpaint.left"),
    ("outpaint-float", wider(top=64.0), "outpaint.top"),
    ("outpaint-huge", wider(right=10**12), "outpaint.right"),
    ("outpaint-feather-over", wider(left=64, feather=257), "outpaint.feather"),
    ("outpaint-10000-keys", wider(**{f"k{i}": i for i in range(10_000)}), "outpaint.k0"),
    ("outpaint-no-margin", wider(feather=8), "outpaint"),
    ("outpaint-with-mask", {**wider(left=64), "mask": data_uri_of(PNG)}, "outpaint"),
    ("outpaint-with-size", {**wider(left=64), "size": "1024*1024"}, "size"),
    ("outpaint-broken-image", {**wider(left=64), "image": "!!!not base64!!!"}, "image"),
    # image: wrong types and other schemes (refused before anything is opened)
    ("image-empty", {"prompt": "a", "image": ""}, "image"),
    ("image-number", {"prompt": "a", "image": 123}, "image"),
    ("image-list", {"prompt": "a", "image": ["http://127.0.0.1/a.png"]}, "image"),
    ("image-file-scheme", img(image="file:///etc/passwd"), "image"),
    ("image-ftp", img(image="ftp://127.0.0.1/cat.png"), "image"),
    ("image-gopher", img(image="gopher://127.0.0.1:6379/_FLUSHALL"), "image"),
    ("image-dict-scheme", img(image="dict://127.0.0.1:11211/stats"), "image"),
    ("image-data-html", img(image="data:text/html;base64," + B64(HTML).decode()), "image"),
    ("image-data-html-plain", img(image="data:text/html,<script>alert(1)</script>"), "image"),
    ("image-javascript", img(image="javascript:alert(document.cookie)"), "image"),
    # image: private, loopback and metadata addresses (refused by the SDK before connecting)
    ("image-metadata", img(image="http://169.254.169.254/latest/meta-data/iam/"), "image"),
    ("image-metadata-v6-mapped", img(image="http://[::ffff:169.254.169.254]/latest/"), "image"),
    ("image-10-net", img(image="http://10.0.0.1/x.png"), "image"),
    ("image-172-16", img(image="http://172.16.0.1/x.png"), "image"),
    ("image-192-168", img(image="https://192.168.1.1/x.png"), "image"),
    ("image-cgnat", img(image="http://100.64.0.1/x.png"), "image"),
    ("image-loopback", img(image="http://127.0.0.1:9/x.png"), "image"),
    ("image-localhost", img(image="http://localhost/x.png"), "image"),
    ("image-v6-loopback", img(image="http://[::1]/x.png"), "image"),
    ("image-zero-host", img(image="http://0.0.0.0/x.png"), "image"),
    ("image-decimal-loopback", img(image="http://2130706433/x.png"), "image"),
    ("image-no-host", img(image="http:///x.png"), "image"),
    # image: broken base64, non-images, truncated files, bombs, oversized strings
    ("image-not-base64", img(image="!!!not base64!!!"), "image"),
    ("image-bad-padding", img(image="aGVsbG8"), "image"),
    ("image-data-uri-bad-payload", img(image="data:image/png;base64,@@@@"), "image"),
    ("image-text", img(image=B64(b"hello world, not an image").decode()), "image"),
    ("image-html", img(image=data_uri_of(HTML, "image/png")), "image"),
    ("image-pdf", img(image=B64(PDF).decode()), "image"),
    ("image-svg-xxe", img(image=data_uri_of(SVG, "image/svg+xml")), "image"),
    ("image-zip", img(image=B64(ZIP).decode()), "image"),
    ("image-truncated-png", img(image=data_uri_of(PNG[:80])), "image"),
    ("image-truncated-jpeg", img(image=data_uri_of(JPEG[: len(JPEG) // 2], "image/jpeg")), "image"),
    ("image-png-bomb-20000x20000", img(image=data_uri_of(PNG_BOMB)), "image"),
    ("image-gif-bomb-65535x65535", img(image=data_uri_of(gif_bomb(), "image/gif")), "image"),
    ("image-50MB-base64", img(image="A" * 50_000_000), "image"),
    ("image-50MB-data-uri", img(image="data:image/png;base64," + "A" * 50_000_000), "image"),
]

# Bodies the SDK's own FastAPI model refuses before the handler runs: a clean 422, no job.
TRANSPORT: list[tuple[str, bytes]] = [
    ("not-json", b"{not json"),
    ("input-missing", b"{}"),
    ("input-null", b'{"input": null}'),
    ("input-list", b'{"input": [1, 2]}'),
    ("input-string", b'{"input": "a red fox"}'),
    ("input-number", b'{"input": 42}'),
    ("body-list", b"[]"),
    ("body-empty", b""),
]


def assert_clean_failure(reply: dict, field: str, elapsed: float) -> None:
    assert reply["status"] == "FAILED", {k: str(v)[:200] for k, v in reply.items()}
    message = reply["error"]
    assert isinstance(message, str) and message.startswith(f"{field}:"), message[:300]
    assert "Traceback" not in message and 'File "' not in message, message[:300]
    assert "output" not in reply  # nothing half-made is reported alongside the error
    assert elapsed < ANSWER_WITHIN, f"took {elapsed:.1f} s"


def runsync(server: LocalAPI, job_input: object) -> tuple[dict, float]:
    # json.dumps, not requests' json=, so NaN and Infinity go out as Python's json writes them.
    body = json.dumps({"input": job_input})
    started = time.monotonic()
    response = requests.post(
        f"{server.url}/runsync",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=ANSWER_WITHIN + 30,
    )
    assert response.status_code == 200, response.text[:500]
    return response.json(), time.monotonic() - started


def test_the_battery_is_big_enough():
    assert len(BATTERY) + len(TRANSPORT) >= 60
    assert len({case_id for case_id, _, _ in BATTERY}) == len(BATTERY)


# ------------------------------------------------------------------- the shared worker
def assert_ssrf_protection_on(server: LocalAPI) -> None:
    """Read from the running process itself: private URLs may only go to a protected worker."""
    environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    assert not any(line.startswith(b"RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=") for line in environ)


@pytest.fixture(scope="module")
def battery_log_start(api: LocalAPI) -> int:
    """Where the shared worker's log stood before this module's first bad request."""
    assert_ssrf_protection_on(api)
    return len(api.log())


@pytest.mark.parametrize(("job_input", "field"), [c[1:] for c in BATTERY], ids=[c[0] for c in BATTERY])
def test_bad_input_fails_cleanly(api, battery_log_start, job_input, field):
    reply, elapsed = runsync(api, job_input)
    assert_clean_failure(reply, field, elapsed)


@pytest.mark.parametrize("body", [c[1] for c in TRANSPORT], ids=[c[0] for c in TRANSPORT])
def test_malformed_bodies_are_refused_by_the_api(api, battery_log_start, body):
    response = requests.post(
        f"{api.url}/runsync", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 422, response.text[:300]
    assert "Traceback" not in response.text


def test_error_messages_say_what_is_allowed(api):
    """Spot checks of the wording: what arrived and what is allowed, for the caller to act on."""
    cases = {
        "size: '1000*1000' is not allowed: it must be 'W*H'": {"prompt": "a", "size": "1000*1000"},
        "num_images: true (a boolean) is not allowed": {"prompt": "a", "num_images": True},
        "seed: 42.0 (a number) is not allowed: it must be an integer": {"prompt": "a", "seed": 42.0},
        "sedd: unknown field; did you mean 'seed'?": {"prompt": "a", "sedd": 1},
        "prompt: a string of 5000000 characters is not allowed": {"prompt": "a" * 5_000_000},
        "image: the base64 data is over the 32 MiB cap": img(image="A" * 50_000_000),
        "image: over the 40 megapixel cap": img(image=data_uri_of(PNG_BOMB)),
        "image: the URL scheme 'gopher' is not allowed": img(image="gopher://127.0.0.1:6379/_x"),
        "non-public address 169.254.169.254": img(image="http://169.254.169.254/latest/"),
    }
    for expected, job_input in cases.items():
        reply, _ = runsync(api, job_input)
        assert expected in reply["error"], (expected, reply["error"][:300])


def test_the_worker_survives_the_battery(api, battery_log_start):
    assert api.process.poll() is None, "the worker process died"
    reply, elapsed = runsync(api, GOOD)
    assert reply["status"] == "COMPLETED", reply
    assert decode_data_uri(reply["output"]["image_url"]).size == (256, 256)
    log = api.settled_log()[battery_log_start:]
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    # The 5 MB prompt and the 50 MB strings are never echoed into the log.
    assert "a" * 5000 not in log and "A" * 5000 not in log


# ------------------------------------------- a worker that may fetch from loopback only
@pytest.fixture(scope="module")
def image_host() -> Iterator[ImageServer]:
    server = ImageServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def loopback_api(tiny_model, tmp_path_factory) -> Iterator[LocalAPI]:
    """The SDK's switch on, so the loopback image server can be reached; it gets no other URL."""
    env = worker_env(tiny_model, RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1")
    with local_api(env, tmp_path_factory.mktemp("bad-input") / "loopback-api.log") as server:
        yield server


HOSTILE_HOSTS: list[tuple[str, Route, str]] = [
    ("http-404", Route(b"nope", status=404), "failed with HTTP 404"),
    ("http-500", Route(b"nope", status=500), "failed with HTTP 500"),
    ("html-page", Route(HTML, headers={"Content-Type": "text/html"}), "not an image"),
    ("truncated-png", Route(PNG[:100], headers={"Content-Type": "image/png"}), "broken or truncated"),
    (
        "truncated-jpeg-no-length",
        Route(JPEG[: len(JPEG) // 3], headers={"Content-Type": "image/jpeg"}, length=False),
        "broken or truncated",
    ),
    ("png-bomb", Route(PNG_BOMB, headers={"Content-Type": "image/png"}), "megapixel cap"),
    ("declared-64MiB", Route(b"x" * 10, headers={"Content-Length": str(64 * 2**20)}), "32 MiB cap"),
    ("streamed-33MiB", Route(b"\x00" * (33 * 2**20), length=False), "32 MiB cap"),
    ("redirect-loop", Route(status=302, headers={"Location": "/redirect-loop"}), "redirects"),
    ("redirect-to-file", Route(status=302, headers={"Location": "file:///etc/passwd"}), "scheme"),
    ("redirect-to-gopher", Route(status=301, headers={"Location": "gopher://127.0.0.1/_x"}), "scheme"),
]


@pytest.mark.parametrize(("route", "says"), [c[1:] for c in HOSTILE_HOSTS], ids=[c[0] for c in HOSTILE_HOSTS])
def test_hostile_image_hosts_fail_cleanly(loopback_api, image_host, route, says, request):
    path = f"/{request.node.callspec.id}"
    image_host.routes[path] = route
    reply, elapsed = runsync(loopback_api, img(image=f"{image_host.url}{path}"))
    assert_clean_failure(reply, "image", elapsed)
    assert says in reply["error"], reply["error"]


def test_unreachable_image_host_fails_cleanly(loopback_api):
    reply, elapsed = runsync(loopback_api, img(image=f"http://127.0.0.1:{free_port()}/x.png"))
    assert_clean_failure(reply, "image", elapsed)
    assert "could not be fetched" in reply["error"]


def test_slow_image_host_hits_the_30_s_cap(loopback_api, image_host):
    """The real cap, not a shortened one: a host trickling 4 MB at about 100 KB/s (40 s in all)."""
    image_host.routes["/slow.png"] = Route(b"\x00" * 4_000_000, delay=0.01)
    reply, elapsed = runsync(loopback_api, img(image=f"{image_host.url}/slow.png"))
    assert_clean_failure(reply, "image", elapsed)
    assert "took over 30 s" in reply["error"], reply["error"]
    assert 29 <= elapsed < 45, f"answered after {elapsed:.1f} s"


def test_the_loopback_worker_survives_and_still_fetches(loopback_api, image_host):
    image_host.routes["/ok.png"] = Route(PNG, headers={"Content-Type": "image/png"})
    assert loopback_api.process.poll() is None, "the worker process died"
    reply, _ = runsync(loopback_api, img(image=f"{image_host.url}/ok.png", strength=0.5))
    assert reply["status"] == "COMPLETED", reply
    assert decode_data_uri(reply["output"]["image_url"]).size == (256, 256)
    log = loopback_api.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    # Only this module's image server was ever asked for anything.
    assert {path for _, path, _ in image_host.received} <= {f"/{c[0]}" for c in HOSTILE_HOSTS} | {
        "/slow.png",
        "/ok.png",
    }
