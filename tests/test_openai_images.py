"""The OpenAI Images API, end to end through the official `openai` SDK.

A loopback stand-in for Runpod's gateway turns `/v2/<endpoint>/openai/v1/<route>` into a job
whose input is `{"openai_route": "/v1/<route>", "openai_input": <body>}`, as the hosted
gateway does, and answers as an OpenAI-compatible server: a completed job's output is a 200
with that body; a failed job's OpenAI error object is a 400 (`invalid_request_error`) or a
500 (`server_error`) with `{"error": {...}}`. Behind it runs the worker twice: as the local
API (`--rp_serve_api`) and as deployed, in the SDK's job loop against the loopback job queue.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from builder.tiny_model import build_tiny_safety_checker
from src.delivery.storage import Storage
from src.jobs.worker import Worker
from src.openai_images.bodies import BadBody, native_input
from src.openai_images.masks import native_mask
from src.openai_images.replies import error_object, images_response
from src.openai_images.routes import OpenAIImages
from src.request.parse import parse_request
from src.runtime.errors import JobError
from src.runtime.settings import Settings
from tests.conftest import data_uri_of, decode_data_uri
from tests.loopback_servers import BUCKET, KEY_ID, SECRET, JobQueue, MotoServer
from tests.test_job_loop import deployed

PROMPT = "a paper boat on a green pond"
GATEWAY_PATH = re.compile(r"/v2/[\w-]+/openai(/v1/[\w/.-]*)")
# One job's result as the job API and the local API both carry it: {"output": ...} or {"error": ...}.
RunJob = Callable[[dict], dict]


class Gateway:
    """Runpod's OpenAI-compatible route on 127.0.0.1, in front of a `RunJob`."""

    def __init__(self, run_job: RunJob) -> None:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._forward(None)

            def do_POST(self) -> None:  # noqa: N802
                self._forward(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))

            def _forward(self, body: object) -> None:
                match = GATEWAY_PATH.fullmatch(self.path.split("?", 1)[0])
                if match is None:
                    return self._answer(404, {"error": {"message": "no such route", "type": "not_found"}})
                job_input = {"openai_route": match[1]}
                if self.command == "POST":
                    job_input["openai_input"] = body
                result = run_job(job_input)
                gateway.inputs.append(job_input)
                if "error" not in result:
                    return self._answer(200, result["output"])
                error = result["error"]
                if not isinstance(error, dict):  # not from the adapter: the SDK's own failure
                    error = {"message": str(error), "type": "server_error", "param": None, "code": None}
                self._answer(400 if error.get("type") == "invalid_request_error" else 500, {"error": error})

            def _answer(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.inputs: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def client(self) -> openai.OpenAI:
        """The openai SDK pointed at the endpoint, as docs/openai.md tells users to."""
        return openai.OpenAI(
            base_url=f"{self.url}/v2/test-endpoint/openai/v1",
            api_key="rp-test-key",
            max_retries=0,
            timeout=300,
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def via_local_api(api) -> RunJob:
    def run_job(job_input: dict) -> dict:
        reply = api.runsync(job_input, timeout=300)
        return {key: reply[key] for key in ("output", "error") if key in reply}

    return run_job


def via_job_queue(queue: JobQueue) -> RunJob:
    def run_job(job_input: dict) -> dict:
        job_id = f"openai-{uuid.uuid4().hex[:12]}"
        queue.add({"id": job_id, "input": job_input})
        assert queue.wait_for([job_id], 300), f"no result for {job_id}"
        return queue.results[job_id]

    return run_job


# ------------------------------------------------------------------- pictures
def picture(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A picture with structure in every region, so kept and regenerated pixels tell apart."""
    gradient = Image.linear_gradient("L")
    across = gradient.transpose(Image.Transpose.ROTATE_90).resize(size)
    return Image.merge("RGB", (gradient.resize(size), across, Image.new("L", size, 90)))


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


def half_mask_rgba(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """OpenAI's convention: the left half transparent (regenerate), the right half opaque (keep)."""
    alpha = np.zeros(size[::-1], dtype=np.uint8)
    alpha[:, size[0] // 2 :] = 255
    mask = Image.new("RGBA", size, (0, 0, 0, 0))
    mask.putalpha(Image.fromarray(alpha))
    return mask


def half_mask_native(size: tuple[int, int] = (256, 256)) -> Image.Image:
    """The same mask natively: white (regenerate) left, black (keep) right."""
    gray = np.zeros(size[::-1], dtype=np.uint8)
    gray[:, : size[0] // 2] = 255
    return Image.fromarray(gray)


def b64_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def payloads(output: dict) -> list[str]:
    """The base64 of each image of a native output (data URIs, no bucket)."""
    return [entry["image_url"].split(",", 1)[1] for entry in output.get("images", [output])]


# ---------------------------------------------------------------- the checks
FAST = {"seed": 7, "num_inference_steps": 2}


def check_generations_equal_native(client: openai.OpenAI, run_job: RunJob, n: int) -> None:
    reply = client.images.generate(
        model="z-image-turbo",
        prompt=PROMPT,
        n=n,
        size="256x256",
        response_format="b64_json",
        quality="high",  # accepted, no effect
        extra_body=FAST,
    )
    native = run_job({"prompt": PROMPT, "num_images": n, "size": "256*256", **FAST})["output"]
    assert [entry.b64_json for entry in reply.data] == payloads(native)
    assert all(entry.url is None and entry.revised_prompt is None for entry in reply.data)
    assert reply.size == "256x256" and reply.output_format == "png" and reply.created > 1_700_000_000
    extra = reply.model_extra or {}
    assert (extra["model"], extra["seed"], extra["cost"]) == ("z-image-turbo", 7, round(0.005 * n, 6))
    assert extra["has_nsfw_concepts"] == [False] * n and extra["timings"]["total"] > 0


def check_masked_edit_keeps_the_opaque_pixels(client: openai.OpenAI, run_job: RunJob) -> None:
    source = picture()
    body = {
        "prompt": PROMPT,
        "image": [png_uri(source)],  # a list holding one, as OpenAI allows
        "mask": png_uri(half_mask_rgba()),
        "size": "256x256",
        "response_format": "b64_json",
        **FAST,
    }
    reply = client.post("/images/edits", body=body, cast_to=openai.types.ImagesResponse)
    out = b64_pixels(reply.data[0].b64_json)
    kept = np.asarray(source)[:, 128:]
    assert np.array_equal(out[:, 128:], kept)  # exact where the mask is opaque
    assert not np.array_equal(out[:, :128], np.asarray(source)[:, :128])  # regenerated where transparent
    # The native inpainting request with the white/black mask and strength 1.0 (OpenAI's default).
    native = run_job(
        {
            "prompt": PROMPT,
            "image": png_uri(source),
            "mask": png_uri(half_mask_native()),
            "size": "256*256",
            "strength": 1.0,
            **FAST,
        }
    )["output"]
    assert [reply.data[0].b64_json] == payloads(native)


def bad_request(client: openai.OpenAI, path: str, body: object) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(path, body=body, cast_to=object)
    error = caught.value
    assert error.type == "invalid_request_error" and error.body["message"] == error.body["message"].strip()
    return error


# --------------------------------------------------------------- local API
@pytest.fixture(scope="module")
def gateway(api) -> Iterator[Gateway]:
    server = Gateway(via_local_api(api))
    yield server
    server.close()


def test_generations_are_the_native_request_s_pixels(gateway, api):
    check_generations_equal_native(gateway.client(), via_local_api(api), n=2)
    assert gateway.inputs[0]["openai_route"] == "/v1/images/generations"
    assert gateway.inputs[0]["openai_input"]["n"] == 2 and gateway.inputs[0]["openai_input"]["seed"] == 7


def test_a_url_in_jpeg_at_another_size(gateway, api):
    reply = gateway.client().images.generate(
        prompt=PROMPT, size="320x256", output_format="jpeg", output_compression=80, extra_body=FAST
    )
    (entry,) = reply.data
    image = decode_data_uri(entry.url)  # no bucket: the url is a data URI
    assert entry.b64_json is None and image.format == "JPEG" and image.size == (320, 256)
    native = via_local_api(api)(
        {"prompt": PROMPT, "size": "320*256", "output_format": "jpeg", "output_quality": 80, **FAST}
    )
    assert entry.url == native["output"]["image_url"]


def test_models_lists_the_served_models(gateway):
    models = gateway.client().models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("z-image-turbo", "model", "tongyi-mai")]
    assert isinstance(models.data[0].created, int)


GENERATIONS, EDITS = "/images/generations", "/images/edits"
UNREACHABLE = "http://127.0.0.1:9/picture.png"  # loopback: refused before any connection


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        (GENERATIONS, ["a", "list"], "openai_input", "must be a JSON object"),
        (GENERATIONS, {"prompt": PROMPT, "n": "2"}, "n", "'2' is not allowed"),
        (GENERATIONS, {"prompt": PROMPT, "n": 5}, "n", "5 is not allowed: it must be an integer from 1 to 4"),
        (GENERATIONS, {"prompt": PROMPT, "seed": "7"}, "seed", "'7' is not allowed"),
        (GENERATIONS, {"prompt": PROMPT, "colour": "red"}, "colour", "colour: unknown field"),
        (GENERATIONS, {"prompt": PROMPT, "stream": True}, "stream", "stream: true is not supported"),
        (GENERATIONS, {"prompt": PROMPT, "background": "transparent"}, "background", "'transparent'"),
        (GENERATIONS, {"prompt": PROMPT, "size": "1000x1000"}, "size", "'1000x1000' is not allowed"),
        (GENERATIONS, {"prompt": PROMPT, "model": "dall-e-3"}, "model", "'dall-e-3' is not allowed"),
        (GENERATIONS, {"prompt": " "}, "prompt", "prompt:"),
        (EDITS, {"prompt": PROMPT, "image": UNREACHABLE, "size": "256x256"}, "image", "is refused"),
        (EDITS, {"prompt": PROMPT, "image": png_uri(picture()), "mask": UNREACHABLE}, "mask", "is refused"),
        ("/images/variations", {"prompt": PROMPT}, "openai_route", "'/v1/images/variations' is not served"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 30 else None,
)
def test_bad_bodies_are_openai_errors_naming_the_field(gateway, path, body, param, words):
    error = bad_request(gateway.client(), path, body)
    assert error.param == param, error.body
    assert words in error.body["message"] and error.body["message"].startswith(param), error.body


def test_edits_without_a_mask_are_image_to_image(gateway, api):
    source = png_uri(picture())
    body = {
        "prompt": PROMPT,
        "image": source,
        "size": "256x256",
        "strength": 0.6,
        "response_format": "b64_json",
    }
    reply = gateway.client().post(EDITS, body={**body, **FAST}, cast_to=openai.types.ImagesResponse)
    native = via_local_api(api)(
        {"prompt": PROMPT, "image": source, "size": "256*256", "strength": 0.6, **FAST}
    )
    assert [reply.data[0].b64_json] == payloads(native["output"])


def native_size_auto() -> bool:
    """Whether the native request takes size "auto" (API.md, "Sizes: auto"), which edits default to."""
    try:
        parse_request({"prompt": PROMPT, "image": "aGk=", "size": "auto"})
    except JobError:
        return False
    return True


@pytest.mark.skipif(not native_size_auto(), reason='the native size "auto" is not on this branch yet')
def test_edits_default_to_the_input_picture_s_size(gateway, api):
    source = png_uri(picture((320, 256)))
    body = {"prompt": PROMPT, "image": source, "response_format": "b64_json", **FAST}
    reply = gateway.client().post(EDITS, body=body, cast_to=openai.types.ImagesResponse)
    assert reply.size == "320x256" and b64_pixels(reply.data[0].b64_json).shape == (256, 320, 3)
    native = via_local_api(api)({"prompt": PROMPT, "image": source, "size": "auto", **FAST})
    assert [reply.data[0].b64_json] == payloads(native["output"])


def test_edits_with_an_alpha_mask_keep_the_opaque_pixels_exactly(gateway, api):
    check_masked_edit_keeps_the_opaque_pixels(gateway.client(), via_local_api(api))


@pytest.fixture(scope="module", autouse=True)
def log_start(api) -> int:
    """Where the shared local API's log stood before this module's first job (others share it)."""
    return len(api.log())


def test_logs_hold_no_prompt_and_no_base64(api, gateway, log_start):
    log = api.log()[log_start:]
    assert "OpenAI /v1/images/generations" in log  # the adapter's line, with the route only
    assert PROMPT not in log
    # Image data, not the error messages' own "a data:image/...;base64, URI" wording.
    assert not re.search(r"base64,[A-Za-z0-9+/=]{16}", log)


# ----------------------------------------------------------------- deployed
def test_the_deployed_job_loop_speaks_openai(tiny_model, tmp_path):
    queue = JobQueue()
    server = Gateway(via_job_queue(queue))
    log = tmp_path / "worker.log"
    try:
        with deployed(queue, tiny_model, log, MAX_CONCURRENCY="2"):
            client = server.client()
            # The first call waits for the worker's cold start.
            check_generations_equal_native(client, via_job_queue(queue), n=1)
            assert [m.id for m in client.models.list().data] == ["z-image-turbo"]
            assert bad_request(client, GENERATIONS, {"prompt": PROMPT, "n": 5}).param == "n"
            assert bad_request(client, "/images/variations", {"prompt": PROMPT}).param == "openai_route"
            check_masked_edit_keeps_the_opaque_pixels(client, via_job_queue(queue))
    finally:
        server.close()
        queue.close()
    assert PROMPT not in log.read_text(), log.read_text()[-2000:]


# -------------------------------------------------- in-process: checker, bucket
def openai_job(worker: Worker, route: str, body: dict | None = None) -> dict:
    job_input = {"openai_route": route, **({"openai_input": body} if body is not None else {})}
    return asyncio.run(OpenAIImages(worker).handle({"id": "openai-test", "input": job_input}))


def test_every_image_flagged_is_a_content_policy_violation(tiny_model, tmp_path):
    checker = build_tiny_safety_checker(tmp_path / "always", nsfw_bias=10.0)
    worker = Worker.start(Settings(model=str(tiny_model), safety_checker_model=str(checker)))
    reply = openai_job(worker, "/v1/images/generations", {"prompt": PROMPT, "size": "256x256", **FAST})
    assert reply["error"]["code"] == "content_policy_violation", reply
    assert reply["error"]["type"] == "invalid_request_error" and "flagged" in reply["error"]["message"]
    off = {"prompt": PROMPT, "size": "256x256", "enable_safety_checker": False, **FAST}
    assert openai_job(worker, "/v1/images/generations", off)["has_nsfw_concepts"] == [False]


def test_with_a_bucket_url_is_a_link_and_b64_json_skips_the_upload(worker, tmp_path):
    store = MotoServer()
    try:
        store.make_bucket()
        settings = Settings(
            model=worker.settings.model,
            safety_checker_model="none",
            bucket_endpoint_url=store.url,
            bucket_access_key_id=KEY_ID,
            bucket_secret_access_key=SECRET,
            bucket_name=BUCKET,
        )
        stored = replace(worker, settings=settings, storage=Storage(settings))
        body = {"prompt": PROMPT, "size": "256x256", **FAST}
        linked = openai_job(stored, "/v1/images/generations", body)
        assert linked["data"][0]["url"].startswith(f"{store.url}/{BUCKET}/")
        uploaded = store.keys("")
        assert len(uploaded) == 1
        inline = openai_job(stored, "/v1/images/generations", {**body, "response_format": "b64_json"})
        assert store.keys("") == uploaded  # nothing more stored
        with requests.get(linked["data"][0]["url"], timeout=30) as response:
            assert base64.b64decode(inline["data"][0]["b64_json"]) == response.content
    finally:
        store.stop()


# ------------------------------------------------------------ pure: replies
@pytest.mark.parametrize(
    ("message", "kind", "param", "code"),
    [
        ("size: '1000x1000' is not allowed: ...", "invalid_request_error", "size", None),
        ("loras[1].path: 'a.ckpt' is not allowed: ...", "invalid_request_error", "loras[1].path", None),
        ("model: 'z-image' is not served by this worker ...", "invalid_request_error", "model", None),
        (
            "enable_prompt_expansion: unknown field; ...",
            "invalid_request_error",
            "enable_prompt_expansion",
            None,
        ),
        (
            "safety: all 2 generated image(s) were flagged ...",
            "invalid_request_error",
            None,
            "content_policy_violation",
        ),
        (
            "output: 4 png image(s) at 2048*2048 make a 31.2 MB response ...",
            "invalid_request_error",
            None,
            None,
        ),
        ("upload: storing 1 of 1 image(s) in bucket 'b' failed ...", "server_error", None, None),
        ("out of GPU memory for this request: try a smaller size", "server_error", None, None),
        ("internal error in job j; the worker logged the details", "server_error", None, None),
    ],
)
def test_native_messages_become_openai_error_objects(message, kind, param, code):
    assert error_object(message) == {"message": message, "type": kind, "param": param, "code": code}


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/images/edits"])
def test_several_unknown_fields_are_each_named_and_the_allowed_ones_listed_once(route):
    picture = {"image": "aGk="} if route.endswith("edits") else {}
    body = {"prompt": "a", **picture, "colour": 1, "sedd": 2, "mood": 3, "lens": 4, "grain": 5}
    with pytest.raises(BadBody) as caught:
        native_input(route, body)
    message = str(caught.value)
    for key in ("colour", "sedd", "mood", "lens", "grain"):
        assert f"{key}: unknown field" in message
    assert "did you mean 'seed'?" in message and message.count("allowed fields:") == 1
    assert len(message) < 700, len(message)
    native = str(
        pytest.raises(JobError, parse_request, {"prompt": "a", "colour": 1, "sedd": 2, "mood": 3}).value
    )
    assert native.count("allowed fields:") == 1 and "mood: unknown field" in native and len(native) < 500


def test_a_job_input_holds_only_the_route_and_the_body():
    with pytest.raises(BadBody) as caught:
        OpenAIImages._route({"openai_route": "/v1/models", "x\nINFO forged": 1})
    assert str(caught.value).startswith("'x\\nINFO forged'...: unknown field") and "\n" not in str(
        caught.value
    )
    with pytest.raises(BadBody) as caught:
        OpenAIImages._route({"openai_route": 7})
    assert caught.value.param == "openai_route" and "/v1/images/edits" in str(caught.value)
    assert OpenAIImages._route({"openai_route": "/v1/models/"}) == "/v1/models"


def test_a_gpu_fault_still_asks_for_a_new_worker():
    native = {"error": "GPU failure in job j: this worker can no longer use its GPU", "refresh_worker": True}
    reply = OpenAIImages._failed(native)
    assert reply["refresh_worker"] is True and reply["error"]["type"] == "server_error"


def test_each_entry_gets_the_expanded_prompt_as_revised_prompt():
    native = {
        "image_url": "data:image/png;base64,AAAA",
        "images": [
            {"image_url": "data:image/png;base64,AAAA", "seed": 1},
            {"image_url": "https://x/b", "seed": 2},
        ],
        "expanded_prompt": "A paper boat, folded from newsprint, on a still green pond at dawn.",
        **dict(model="z-image-turbo", width=256, height=320, output_format="png", seed=1, cost=0.01),
        **dict(timings={"total": 1.0}, has_nsfw_concepts=[False, False]),
    }
    reply = images_response(native, "url")
    assert [entry["url"] for entry in reply["data"]] == ["data:image/png;base64,AAAA", "https://x/b"]
    assert {entry["revised_prompt"] for entry in reply["data"]} == {native["expanded_prompt"]}
    assert reply["size"] == "256x320"
    plain = {key: value for key, value in native.items() if key != "expanded_prompt"}
    assert all("revised_prompt" not in entry for entry in images_response(plain, "url")["data"])


@pytest.mark.parametrize(
    ("mask", "native"),
    [
        (Image.new("RGBA", (4, 2), (255, 255, 255, 0)), 255),  # transparent: regenerate
        (Image.new("RGBA", (4, 2), (0, 0, 0, 255)), 0),  # opaque: keep, whatever its colour
        (Image.new("LA", (4, 2), (0, 128)), 127),  # half: blend
        (Image.new("L", (4, 2), 200), 200),  # no alpha: read as the native mask
        (Image.new("RGB", (4, 2), (255, 255, 255)), 255),
    ],
    ids=["transparent", "opaque", "half", "gray", "rgb"],
)
def test_masks_in_openai_s_convention_become_native_masks(mask, native):
    converted = decode_data_uri(native_mask(png_uri(mask)))
    assert converted.mode == "L" and converted.size == (4, 2)
    assert set(np.asarray(converted).flatten().tolist()) == {native}
