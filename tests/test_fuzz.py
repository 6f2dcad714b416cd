"""Property tests: the request model and the local API under generated input.

`parse_request` is the only reader of a job's input, so it is fuzzed directly with many
examples: whatever JSON arrives, it returns a `GenerateRequest` or raises a `JobError`
whose message a caller can act on, and never anything else. The local API gets a bounded
number of generated bodies: each is answered COMPLETED or FAILED (never a 500 or a hang),
with exactly the message `parse_request` gives for the same input. The load-balancing server
(src/lb/) gets the same bodies on /runsync, and generated JSON, bytes and forms on its OpenAI
routes: each is answered 200 or 400 with the route's error shape, and it keeps serving.

No generated value reaches the network: image strings that look like URLs are only the
IP-literal samples below, which the shared worker's SSRF protection refuses unopened.
"""

from __future__ import annotations

import json
import math
import os
import re
import string

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from src.request.models import MODELS
from src.request.parse import parse_request
from src.request.schema import ACCELERATION_LEVELS, FIELDS, MAX_SEED, GenerateRequest
from src.runtime.errors import JobError
from tests.conftest import data_uri_of, png_bytes
from tests.load_balancer import InProcessLB, wait_until
from tests.test_bad_input import assert_ssrf_protection_on

MAX_MESSAGE = 2000  # characters: an error is a sentence or a few, never a dump of the input
TINY = {"size": "256*256", "num_inference_steps": 1, "num_images": 1}

# ------------------------------------------------------------------------ strategies
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# Values near each field's rules, so generation reaches the range and cross-field checks.
near_rules = {
    "prompt": st.text(max_size=50) | st.sampled_from(["", "  ", "a" * 4001, "一只猫", "a\x00b"]),
    "image": st.sampled_from(
        [
            data_uri_of(png_bytes((32, 32))),
            "",
            "!!!",
            "aGVsbG8=",
            "data:text/html,<b>x</b>",
            "ftp://127.0.0.1/x.png",
            "file:///etc/passwd",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/x.png",
        ]
    )
    # Generated text never looks like a URL: no generated host is ever resolved.
    | st.text(max_size=30).filter(lambda s: "://" not in s),
    "mask": st.sampled_from(
        [
            data_uri_of(png_bytes((32, 32), (255, 255, 255))),  # the size of the sample image
            data_uri_of(png_bytes((16, 16), (0, 0, 0))),
            data_uri_of(png_bytes((32, 32), (0, 0, 0))),  # all black: the input comes back
            "",
            "!!!",
            "ftp://127.0.0.1/x.png",
            "http://169.254.169.254/latest/meta-data/",
        ]
    )
    | st.text(max_size=30).filter(lambda s: "://" not in s),
    "size": st.sampled_from(
        ["256*256", "512x512", "1024*1024", "1000*1000", "0*0", "", "2048X2048", "auto", "AUTO"]
    )
    | st.from_regex(r"-?\d{1,5}[*xX]\d{1,5}", fullmatch=True),
    "strength": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, 0.0, 1.0, "0.5", True]),
    "seed": st.integers(-3, 2**33) | st.sampled_from([-1, 0, MAX_SEED, MAX_SEED + 1, 1.0, "1"]),
    "output_format": st.sampled_from(["png", "PNG", "jpeg", "JPG", "webp", " webp ", "gif", "", "bmp"]),
    "enable_safety_checker": st.sampled_from([True, False, "true", "false", 0, 1, None]),
    "num_images": st.integers(-1, 6) | st.sampled_from([1.0, "2", True]),
    "num_inference_steps": st.integers(-1, 60) | st.sampled_from([8.0, "8", False]),
    "guidance_scale": st.floats(-1, 25) | st.sampled_from([0, 20, "1", True, math.nan, math.inf]),
    "negative_prompt": st.text(max_size=30) | st.sampled_from(["b" * 4001, None]),
    "output_quality": st.integers(-1, 102) | st.sampled_from([95.0, "95", True]),
    # No generated LoRA path is ever fetched: file names (absent from LORA_DIRS) and URLs the
    # SSRF rules refuse before any connection.
    "loras": st.sampled_from(
        [
            [],
            [{"path": "style.safetensors"}],
            [{"path": "style.safetensors", "scale": 5}],
            [{"path": "style.safetensors", "scale": "1"}],
            [{"path": "../style.safetensors"}],
            [{"path": "style.ckpt"}],
            [{"path": "http://10.0.0.1/style.safetensors"}],
            [{"path": "a.safetensors"}, {"path": "a.safetensors"}],
            [{"path": "a.safetensors", "weight": 1}],
            [{"path": f"l{i}.safetensors"} for i in range(4)],
            [1],
            "style.safetensors",
        ]
    ),
    "control_image": st.sampled_from(
        [data_uri_of(png_bytes((32, 32))), "", "!!!", "ftp://127.0.0.1/x.png", "http://10.0.0.1/x.png"]
    ),
    "control_preprocess": st.sampled_from(["none", "canny", "depth", "pose", "hed", "", "CANNY", None]),
    "control_scale": st.floats(-0.5, 2.5) | st.sampled_from([0, 2, "1", True, math.nan]),
    "control_start": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, 0.5, "0.5", True, math.nan]),
    "control_end": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, 0.5, "1", False, math.inf]),
    "model": st.sampled_from(["z-image-turbo", "z-image", "Z-Image", "", "flux", None, 1, ["z-image"]]),
    "acceleration": st.sampled_from(["none", "regular", "high", "HIGH", "fast", "", None, 2, ["high"]]),
    "enable_prompt_expansion": st.sampled_from([True, False, "true", "false", 0, 1, None]),
    # Valid ones stay small: the canvas of the 32x32 sample image is scaled up to 256 a side.
    "outpaint": st.sampled_from(
        [
            {"left": 16},
            {"top": 8, "bottom": 8, "feather": 4},
            {"left": 16, "right": 16, "top": 16, "bottom": 16, "feather": 256},
            {},
            {"left": 0},
            {"left": -1},
            {"left": 1.5},
            {"left": 16.0},
            {"left": True},
            {"top": "16"},
            {"right": 2049},
            {"left": 16, "feather": 257},
            {"left": 16, "Left": 16},
            None,
            "left",
            [16],
        ]
    ),
    "seed_variance": st.sampled_from(
        [
            {"strength": 0.5},
            {"strength": 2, "fraction": 1, "until": 1.0},
            {"strength": 0.0, "until": 0.5},
            {},
            {"strength": 4.5},
            {"strength": "1"},
            {"strength": True},
            {"strength": 1, "fraction": 1.5},
            {"strength": 1, "until": math.nan},
            {"strength": 1, "steps": 2},
            None,
            0.5,
        ]
    ),
    # Valid ones stay small: the 32x32 sample image times the factor.
    "upscale": st.sampled_from(
        [
            {},
            {"factor": 2.0},
            {"factor": 4},
            {"factor": 1.0},
            {"factor": 4.5},
            {"factor": "2"},
            {"factor": True},
            {"factor": math.nan},
            {"scale": 2},
            None,
            2,
            [2],
        ]
    ),
}
field_values = st.sampled_from(list(FIELDS)).flatmap(
    lambda name: st.tuples(st.just(name), near_rules[name] | json_values)
)
unknown_keys = st.text(alphabet=string.ascii_letters + string.digits + "_-. ", min_size=1, max_size=24)
# At most six keys: each problem is one clause of the message, so six bound its length.
requests_like = st.lists(
    field_values | st.tuples(unknown_keys, json_values), max_size=6, unique_by=lambda kv: kv[0]
).map(dict)
any_input = requests_like | json_values
# A valid tiny request with up to two fields replaced: about half of these stay valid, so the
# API fuzz runs real jobs too, not only refusals.
near_valid = st.lists(field_values, max_size=2).map(
    lambda pairs: {"prompt": "a red fox", **TINY, "output_format": "jpeg", **dict(pairs)}
)


def assert_actionable(message: str, raw: object) -> None:
    """A message a caller can act on: non-empty, short, no traceback, and it starts with a field."""
    assert message and message.strip() == message
    assert len(message) < MAX_MESSAGE, len(message)
    assert "Traceback" not in message and 'File "' not in message
    keys = [str(key) for key in raw] if isinstance(raw, dict) else []
    # An unknown key is named as sent, or quoted and cut when it is long or not plain text.
    names = {"input", *FIELDS, *keys, *(repr(k[:40]) + ("..." if len(k) > 40 else "") for k in keys)}
    # An entry of `loras` is named by its index (and key): `loras[0].path: ...`.
    lora_entry = re.match(r"loras\[\d+\](\.\w+)?: ", message) is not None
    # A key of `outpaint`, `upscale` or `seed_variance` is named inside it: `outpaint.left: ...`.
    lora_entry |= re.match(r"(outpaint|upscale|seed_variance)\.\S+: ", message) is not None
    assert lora_entry or any(message.startswith(f"{name}:") for name in names), message[:200]


def assert_sound(request: GenerateRequest) -> None:
    """Every accepted request is within the contract, with real types (no silent coercion)."""
    assert type(request.prompt) is str and len(request.prompt) <= 4000
    assert request.prompt.strip() or request.upscale is not None  # an upscale may leave it blank
    if request.size != "auto":  # resolved when the picture is open
        assert request.width % 16 == 0 and request.height % 16 == 0
        assert 256 <= request.width <= 2048 and 256 <= request.height <= 2048
    assert type(request.seed) is int and -1 <= request.seed <= MAX_SEED
    assert type(request.num_images) is int and 1 <= request.num_images <= 4
    assert request.model in MODELS
    steps = request.num_inference_steps
    assert type(steps) is int and 1 <= steps <= MODELS[request.model].max_steps
    assert type(request.output_quality) is int and 1 <= request.output_quality <= 100
    assert type(request.enable_safety_checker) is bool
    assert request.output_format in ("png", "jpeg", "webp")
    assert math.isfinite(request.strength) and 0.0 <= request.strength <= 1.0
    assert math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= 20.0
    assert request.image is not None or "strength" not in request.model_fields_set
    assert request.image is not None or request.mask is None
    assert request.acceleration in ACCELERATION_LEVELS
    if request.seed_variance is not None:
        for key, top in (("strength", 4.0), ("fraction", 1.0), ("until", 1.0)):
            value = getattr(request.seed_variance, key)
            assert type(value) is float and 0.0 <= value <= top


# ----------------------------------------------------------------- the request model
@settings(max_examples=1500, deadline=None)
@given(any_input)
def test_parse_request_accepts_or_explains(raw):
    try:
        request = parse_request(raw)
    except JobError as err:
        assert_actionable(str(err), raw)
        return
    assert isinstance(request, GenerateRequest)
    assert_sound(request)
    # What was accepted parses again to the same request (nothing depended on a lucky default).
    again = parse_request(request.model_dump(exclude_unset=True))
    assert again == request


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(list(FIELDS)), json_values, min_size=1))
def test_wrong_types_in_known_fields_name_those_fields(raw):
    try:
        parse_request(raw)
    except JobError as err:
        message = str(err)
        assert_actionable(message, raw)
        first = message.split(":", 1)[0]
        assert first in raw or first == "prompt"  # a missing prompt is named too


def test_hostile_keys_are_not_echoed_unbounded():
    """A key is the caller's text too: it is shortened and kept on one line like any value."""
    cases = {
        "long key": {"prompt": "a", "k" * 5000: 1},
        "many keys": {"prompt": "a", **{f"k{i}": i for i in range(1000)}},
        "newline key": {"prompt": "a", "x\nINFO   | src.jobs.worker | job forged: done": 1},
        "empty key": {"prompt": "a", "": 1},
    }
    for name, raw in cases.items():
        with pytest.raises(JobError) as caught:
            parse_request(raw)
        message = str(caught.value)
        assert len(message) < MAX_MESSAGE, (name, len(message))
        assert "\n" not in message and "k" * 100 not in message, name
        assert message.split(":", 1)[0].strip(), (name, message[:100])


# --------------------------------------------------------------------- the local API
def _tiny_if_valid(raw: object) -> tuple[object, str | None]:
    """(the body to send, the error parse_request gives or None); valid ones are made tiny."""
    try:
        parse_request(raw)
    except JobError as err:
        return raw, str(err)
    assert isinstance(raw, dict)
    tiny = {**raw, **TINY}  # still valid: only the cost changes
    if raw.get("outpaint") is not None or raw.get("upscale") is not None:
        del tiny["size"]  # outpainting and upscaling make their own size (`auto`), and no other
    parse_request(tiny)
    return tiny, None


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(near_valid | requests_like)
def test_local_api_answers_every_generated_body(api, raw):
    assert_ssrf_protection_on(api)  # private URLs among the samples go only to a protected worker
    job_input, expected_error = _tiny_if_valid(raw)
    event("refused by the model" if expected_error else "valid request")
    response = requests.post(
        f"{api.url}/runsync",
        data=json.dumps({"input": job_input}),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 200, response.text[:500]
    reply = response.json()
    assert reply["status"] in ("COMPLETED", "FAILED"), reply
    if expected_error is not None:
        # The API says exactly what the model says: nothing is lost or added on the way.
        assert reply == {"id": reply["id"], "status": "FAILED", "error": expected_error}
    elif reply["status"] == "FAILED" and job_input.get("model", "z-image-turbo") != "z-image-turbo":
        # This worker serves Turbo only: a valid request for another model is refused, naming it.
        assert reply["error"].startswith(f"model: {job_input['model']!r} is not served by this worker"), reply
    elif reply["status"] == "FAILED" and "control_image" in job_input:
        # This worker has no ControlNet: every control job is refused, naming the field.
        assert reply["error"].startswith("control_image: this worker has no ControlNet"), reply
    elif reply["status"] == "FAILED" and job_input.get("enable_prompt_expansion") is True:
        # This worker has no prompt expander: every other expansion job is refused, naming the field.
        assert reply["error"].startswith("enable_prompt_expansion: this worker has no prompt expander"), reply
    elif reply["status"] == "FAILED" and job_input.get("loras") and reply["error"].startswith("loras["):
        # A LoRA file name that no LORA_DIRS folder holds, or a private URL the SSRF rules refuse.
        assert "was not found in LORA_DIRS" in reply["error"] or " is refused: " in reply["error"], reply
    elif reply["status"] == "FAILED":
        # Valid as a request, refused only when the image or mask is loaded.
        assert "image" in job_input and reply["error"].startswith(("image:", "mask:")), reply
        assert_actionable(reply["error"], job_input)
    else:
        output = reply["output"]
        request = parse_request(job_input)
        if request.size == "auto":  # of the one valid sample picture, 32x32 (or its canvas)
            request = request.with_auto_size((32, 32))
        assert (output["width"], output["height"]) == (request.width, request.height)
        assert output["output_format"] == parse_request(job_input).output_format


def test_the_api_is_still_up_after_fuzzing(api):
    assert api.process.poll() is None
    reply = api.runsync({"prompt": "after fuzzing", **TINY, "output_format": "jpeg"})
    assert reply["status"] == "COMPLETED"


# ------------------------------------------------------- the load-balancing server
LB_ROUTES = ("/v1/images/generations", "/v1/images/edits", "/runsync")
OPENAI_KEYS = (
    "prompt",
    "n",
    "size",
    "response_format",
    "quality",
    "image",
    "mask",
    "seed",
    "loras",
    "stream",
)
# OpenAI-shaped bodies; the overlay keeps the valid ones tiny, so they run real jobs quickly.
openai_bodies = st.tuples(
    st.dictionaries(
        st.sampled_from(OPENAI_KEYS) | unknown_keys, near_rules["prompt"] | json_values, max_size=5
    ),
    st.booleans(),
).map(lambda pair: {**pair[0], "size": "256x256", "num_inference_steps": 1, "n": 1} if pair[1] else pair[0])
form_fields = st.dictionaries(
    st.sampled_from(OPENAI_KEYS) | unknown_keys,
    st.text(max_size=20) | st.sampled_from(["true", "2", "1.5", "[]", '[{"path": "a.safetensors"}]']),
    max_size=5,
)


@pytest.fixture(scope="module")
def lb(worker):
    # Generated image URLs are private IP literals: the in-process worker must refuse them unopened.
    assert os.environ.get("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS") is None
    server = InProcessLB(lambda: worker, max_concurrency=2)
    wait_until(lambda: requests.get(f"{server.url}/ping", timeout=5).status_code == 200, "ready")
    yield server
    assert server.close() == 0


def _error_message(path: str, response: requests.Response) -> str:
    """The message of a refusal, in the route's shape: FAILED on /runsync, OpenAI's error elsewhere."""
    reply = response.json()
    if path == "/runsync":
        assert reply["status"] == "FAILED" and set(reply) == {"id", "status", "error"}, reply
        return reply["error"]
    assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert reply["error"]["type"] == "invalid_request_error", reply
    return reply["error"]["message"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(near_valid | requests_like)
def test_lb_runsync_answers_every_generated_body_as_the_model_does(lb, raw):
    job_input, expected_error = _tiny_if_valid(raw)
    response = requests.post(f"{lb.url}/runsync", data=json.dumps({"input": job_input}), timeout=60)
    reply = response.json()
    if expected_error is not None:
        assert response.status_code == 400 and reply == {
            "id": reply["id"],
            "status": "FAILED",
            "error": expected_error,
        }
    else:  # a valid request fails only on something it names (see the local API's test above)
        assert response.status_code == (200 if reply["status"] == "COMPLETED" else 400), reply


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.sampled_from(LB_ROUTES),
    openai_bodies.map(json.dumps).map(str.encode) | st.binary(max_size=200),
    st.sampled_from(
        ["application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=b"]
    ),
)
def test_lb_answers_any_body_on_any_route(lb, path, body, content_type):
    response = requests.post(f"{lb.url}{path}", data=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code in (200, 400), (response.status_code, response.text[:300])
    if response.status_code == 400:
        assert_actionable_length(_error_message(path, response))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    form_fields, st.sampled_from([None, "image", "image[]", "mask", "control_image"]), st.binary(max_size=64)
)
def test_lb_answers_any_multipart_edit(lb, fields, file_field, junk):
    files = {"image": ("in.png", png_bytes((32, 32)), "image/png")}
    if file_field is not None:
        files[file_field] = ("x.bin", junk or png_bytes((16, 16)), "application/octet-stream")
    data = {"prompt": "a", "size": "256x256", "num_inference_steps": "1", **fields}
    response = requests.post(f"{lb.url}/v1/images/edits", data=data, files=files, timeout=60)
    assert response.status_code in (200, 400), (response.status_code, response.text[:300])
    if response.status_code == 400:
        assert_actionable_length(_error_message("/v1/images/edits", response))


def assert_actionable_length(message: str) -> None:
    # The OpenAI adapter lists the allowed fields once, however many keys are unknown.
    assert message and len(message) < MAX_MESSAGE and "\n" not in message, message[:300]


def test_the_lb_server_is_still_up_after_fuzzing(lb):
    response = requests.post(f"{lb.url}/runsync", json={"input": {"prompt": "after", **TINY}}, timeout=120)
    assert response.status_code == 200 and response.json()["status"] == "COMPLETED"
    assert lb.in_flight == 0
