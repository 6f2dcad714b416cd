"""Delivery through S3-compatible storage, against a real S3 server on loopback.

The store is moto's standalone server run as a subprocess (`python -m moto.server`), so a
test can stop it mid-job and start it again on the same port. Nothing here stubs boto3:
where a test needs a slow, refusing or silent store, a small TCP proxy sits between the
worker and the real server. The worker runs both in-process (`Worker.start`) and as the
local API subprocess (`python handler.py --rp_serve_api`).

moto does not check presigned-URL signatures, so the link's SigV4 signature is checked
here against the AWS specification with hashlib/hmac; PUT signatures are checked by a
moto server that enforces IAM credentials.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import boto3
import pytest
import requests
from PIL import Image

from src.delivery.encoding import encode_image
from src.delivery.storage import PRESIGN_SECONDS, Storage, addressing_for, region_for
from src.jobs.worker import Worker
from src.runtime.errors import JobError
from src.runtime.settings import Settings
from tests.conftest import (
    ROOT,
    handle_job,
    local_api,
    png_bytes,
    run_input,
    worker_env,
)
from tests.loopback_servers import BUCKET, KEY_ID, SECRET, MotoServer, StoreProxy

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SMALL = {"size": "512*512", "num_inference_steps": 1}


# -------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3() -> Iterator[MotoServer]:
    server = MotoServer()
    server.make_bucket()
    yield server
    server.stop()


@pytest.fixture
def own_s3() -> Iterator[MotoServer]:
    """A store of the test's own, for tests that stop it."""
    server = MotoServer()
    server.make_bucket()
    yield server
    server.stop()


@pytest.fixture
def proxy(s3: MotoServer) -> Iterator[StoreProxy]:
    server = StoreProxy(s3.port)
    yield server
    server.close()


def bucket_settings(model: Path, endpoint: str, **override) -> Settings:
    values = dict(
        model=str(model),
        safety_checker_model="none",
        bucket_endpoint_url=endpoint,
        bucket_access_key_id=KEY_ID,
        bucket_secret_access_key=SECRET,
        bucket_name=BUCKET,
    )
    return Settings(**{**values, **override})


@pytest.fixture(scope="module")
def store_worker(tiny_model: Path, s3: MotoServer) -> Worker:
    """The real worker on the tiny model, uploading to the module's store."""
    return Worker.start(bucket_settings(tiny_model, s3.url))


def same_worker_with(base: Worker, settings: Settings) -> Worker:
    """The loaded pipeline with another store: what Worker.start builds, without a second model load."""
    return replace(base, settings=settings, storage=Storage(settings))


def job(worker: Worker, job_id: str, **fields) -> dict:
    return handle_job(worker, {"id": job_id, "input": {"prompt": "a red kite over hills", **SMALL, **fields}})


def key_of(url: str) -> str:
    path = urlsplit(url).path
    assert path.startswith(f"/{BUCKET}/"), url  # path-style on a loopback endpoint
    return path.removeprefix(f"/{BUCKET}/")


def sigv4_query_signature(url: str, secret: str) -> str:
    """The SigV4 signature a presigned GET URL must carry, computed from the AWS spec."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(params)
    signed = sorted((k, v) for k, v in params if k != "X-Amz-Signature")
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in signed)
    canonical_request = "\n".join(
        ["GET", parts.path, canonical_query, f"host:{parts.netloc}\n", "host", "UNSIGNED-PAYLOAD"]
    )
    _, date, region, service, terminator = query["X-Amz-Credential"].split("/")
    scope = f"{date}/{region}/{service}/{terminator}"
    digest = hashlib.sha256(canonical_request.encode()).hexdigest()
    string_to_sign = "\n".join(["AWS4-HMAC-SHA256", query["X-Amz-Date"], scope, digest])
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, terminator):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def assert_secret_free(text: str, urls: list[str] = ()) -> None:
    assert SECRET not in text and KEY_ID not in text
    assert not re.search(r"X-Amz-Signature=[0-9a-f]{8}", text)
    for url in urls:
        assert dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"] not in text


# ------------------------------------------------------------------ upload and fetch
def test_a_job_s_image_is_stored_and_its_link_returns_the_generated_bytes(store_worker, worker):
    client = store_worker.storage.client
    stored = job(store_worker, "fetch-job", seed=5)
    assert "error" not in stored, stored
    # The bucket-less worker returns the same image inline: same model, seed and encoder.
    inline = job(worker, "inline", seed=5)
    expected = base64.b64decode(inline["image_url"].split(",", 1)[1])

    fetched = requests.get(stored["image_url"], timeout=10)
    assert fetched.status_code == 200
    assert fetched.content == expected and fetched.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (512, 512)
    assert stored["timings"]["upload"] > 0 and stored["cost"] == 0.005
    assert store_worker.storage.client is client  # the one client made at start serves every job


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_each_format_comes_back_with_its_bytes_and_content_type(tiny_model, s3, fmt):
    data = encode_image(Image.new("RGB", (64, 48), (10, 200, 30)), fmt, 90)
    [url] = Storage(bucket_settings(tiny_model, s3.url)).upload_all("format-job", [data], fmt)
    assert key_of(url).endswith({"png": ".png", "jpeg": ".jpg", "webp": ".webp"}[fmt])
    fetched = requests.get(url, timeout=10)
    assert fetched.status_code == 200
    assert fetched.content == data and fetched.headers["Content-Type"] == MIME[fmt]


def test_the_link_is_a_sigv4_presigned_get_valid_exactly_7_days(store_worker):
    url = job(store_worker, "link-job", seed=1)["image_url"]
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert f"{parts.scheme}://{parts.netloc}" == store_worker.settings.bucket_endpoint_url
    assert re.fullmatch(r"link-job/0-[0-9a-f]{32}\.png", key_of(url))

    assert PRESIGN_SECONDS == 604800 and query["X-Amz-Expires"] == "604800"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-SignedHeaders"] == "host"
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 300
    assert query["X-Amz-Credential"] == f"{KEY_ID}/{signed_at:%Y%m%d}/us-east-1/s3/aws4_request"
    assert query["X-Amz-Signature"] == sigv4_query_signature(url, SECRET)
    assert "AWSAccessKeyId" not in query and "Signature" not in query  # no SigV2 link
    assert SECRET not in url


def test_several_images_get_distinct_keys_from_the_job_id_only(store_worker, s3):
    prompt = "a purple giraffe named Bartholomew"
    output = job(store_worker, "multi-job-42", prompt=prompt, num_images=3, seed=10)
    assert "error" not in output, output
    assert [entry["seed"] for entry in output["images"]] == [10, 11, 12]
    urls = [entry["image_url"] for entry in output["images"]]
    assert output["image_url"] == urls[0] and output["cost"] == 0.015

    keys = [key_of(url) for url in urls]
    assert len(set(keys)) == 3
    for i, key in enumerate(keys):
        assert re.fullmatch(rf"multi-job-42/{i}-[0-9a-f]{{32}}\.png", key)
    for word in prompt.lower().split():
        assert all(word not in url.lower() for url in urls if len(word) > 2)
    assert s3.keys("multi-job-42/") == sorted(keys)

    for url in urls:
        fetched = requests.get(url, timeout=10)
        assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (512, 512)


def test_images_of_one_job_are_uploaded_in_parallel(tiny_model, proxy):
    storage = Storage(bucket_settings(tiny_model, proxy.url))
    proxy.delay = 0.3  # every answer is held back, so sequential uploads could never overlap
    urls = storage.upload_all("parallel-job", [png_bytes(color=(i, 0, 0)) for i in range(3)], "png")
    assert len(urls) == 3
    assert proxy.max_in_flight == 3


def test_uploads_carry_no_default_checksums_that_some_stores_reject(tiny_model, proxy):
    storage = Storage(bucket_settings(tiny_model, proxy.url))
    storage.upload_all("checksum-job", [png_bytes()], "png")
    [put] = [head.lower() for head in proxy.heads if head.startswith("PUT ")]
    assert "content-type: image/png" in put
    for marker in ("x-amz-checksum", "x-amz-sdk-checksum-algorithm", "x-amz-trailer", "aws-chunked"):
        assert marker not in put, put

    # Control: boto3's defaults (>= 1.36) do send them, so the check above can fail.
    proxy.heads.clear()
    plain = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    plain.put_object(Bucket=BUCKET, Key="control.png", Body=png_bytes())
    assert "x-amz-checksum" in proxy.heads[-1].lower() or "x-amz-trailer" in proxy.heads[-1].lower()


def test_production_bounds_on_the_client(tiny_model):
    client = Storage(bucket_settings(tiny_model, "https://s3.us-east-1.amazonaws.com")).client
    config = client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}  # the first try and 2 retries
    assert (config.connect_timeout, config.read_timeout) == (5.0, 15.0)
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"


# ------------------------------------------------------------------------- failures
def test_store_stopped_mid_job_fails_it_cleanly_and_the_worker_serves_the_next(
    tiny_model, store_worker, own_s3, caplog
):
    caplog.set_level(logging.INFO)
    worker = same_worker_with(store_worker, bucket_settings(tiny_model, own_s3.url))
    assert "error" not in job(worker, "before")  # a kept-alive connection to the store now exists

    def stop_store(step: int, total: int) -> None:
        if step == 1:
            own_s3.stop()

    started = time.monotonic()
    request = {"prompt": "a boat", **SMALL, "num_inference_steps": 2}
    with pytest.raises(JobError) as failed:
        run_input(worker, "mid-run", request, on_step=stop_store)
    message = str(failed.value)
    assert message.startswith(
        f"upload: storing 1 of 1 image(s) in bucket '{BUCKET}' at 127.0.0.1:{own_s3.port}"
    )
    assert "could not reach the store" in message and "No image was returned" in message
    assert time.monotonic() - started < 30

    # Still down: the handler turns it into the one error shape; no data URI fallback.
    down = job(worker, "while-down")
    assert set(down) == {"error"} and "could not reach the store" in down["error"]

    own_s3.start()  # same port, empty store
    own_s3.make_bucket()
    back = job(worker, "after", seed=3)
    assert "error" not in back, back
    assert requests.get(back["image_url"], timeout=10).status_code == 200
    assert own_s3.keys("") == [key_of(back["image_url"])]  # nothing from the failed jobs
    assert_secret_free(message + down["error"] + caplog.text, [back["image_url"]])


def test_a_missing_bucket_fails_the_job_at_once(tiny_model, store_worker, s3):
    worker = same_worker_with(store_worker, bucket_settings(tiny_model, s3.url, bucket_name="no-such-bucket"))
    started = time.monotonic()
    output = job(worker, "nobucket")
    assert set(output) == {"error"}
    assert output["error"].startswith("upload: storing 1 of 1 image(s) in bucket 'no-such-bucket'")
    assert "the bucket does not exist (NoSuchBucket, HTTP 404)" in output["error"]
    assert "BUCKET_NAME" in output["error"]
    assert time.monotonic() - started < 10
    assert_secret_free(output["error"])


def test_a_partly_stored_job_fails_and_leaves_nothing_behind(tiny_model, s3, proxy):
    storage = Storage(bucket_settings(tiny_model, proxy.url))
    proxy.puts_allowed = 1  # the first upload is stored; the store cuts off every other one
    with pytest.raises(JobError) as failed:
        storage.upload_all("partial-job", [png_bytes(color=(i, 9, 9)) for i in range(3)], "png")
    assert str(failed.value).startswith("upload: storing 2 of 3 image(s)")
    assert any(head.startswith("DELETE ") for head in proxy.heads)
    assert s3.keys("partial-job/") == []


def test_a_job_stopped_during_its_upload_leaves_nothing_in_the_bucket(tiny_model, store_worker, s3, proxy):
    """The platform stops the job while its images go up: they are removed, no link is made."""
    worker = same_worker_with(store_worker, bucket_settings(tiny_model, proxy.url))
    proxy.delay = 1.0  # each response held back, so the stop lands mid-upload

    async def stop_mid_upload() -> None:
        task = asyncio.create_task(
            worker.run("stopped-upload", {"prompt": "a mill", **SMALL, "num_images": 2})
        )
        while not any(head.startswith("PUT ") for head in proxy.heads):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(stop_mid_upload())
    assert sum(head.startswith("PUT ") for head in proxy.heads) == 2
    assert s3.keys("stopped-upload/") == []


def test_a_store_that_never_answers_fails_within_the_timeouts(tiny_model, s3, proxy, monkeypatch):
    monkeypatch.setattr(Storage, "read_timeout", 0.5)
    monkeypatch.setattr(Storage, "max_attempts", 2)
    storage = Storage(bucket_settings(tiny_model, proxy.url))
    proxy.swallow = True
    started = time.monotonic()
    with pytest.raises(JobError) as failed:
        storage.upload_all("silent-job", [png_bytes()], "png")
    assert "did not answer in time (ReadTimeoutError, up to 2 attempts)" in str(failed.value)
    assert time.monotonic() - started < 5
    assert s3.keys("silent-job/") == []


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[tuple[MotoServer, dict[str, tuple[str, str]]]]:
    """A store that checks every request's SigV4 signature and IAM permissions."""
    server = MotoServer()
    server.make_bucket()
    iam = server.client("iam")
    keys = {}
    for user, actions in {"writer": ["s3:PutObject", "s3:GetObject"], "reader": ["s3:GetObject"]}.items():
        iam.create_user(UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": f"arn:aws:s3:::{BUCKET}/*"}],
        }
        iam.put_user_policy(UserName=user, PolicyName="images", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    # From here on moto authenticates every request (its INITIAL_NO_AUTH_ACTION_COUNT, set to 0).
    requests.post(f"{server.url}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    yield server, keys
    server.stop()


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("unknown key", "InvalidAccessKeyId"),
        ("wrong secret", "SignatureDoesNotMatch"),
        ("no write permission", "AccessDenied"),
    ],
)
def test_refused_credentials_fail_the_job_with_what_to_check(tiny_model, store_worker, strict_s3, case, code):
    server, keys = strict_s3
    key_id, secret = {
        "unknown key": ("AKIANOSUCHKEY0000000", keys["writer"][1]),
        "wrong secret": (keys["writer"][0], "not-the-secret-0000"),
        "no write permission": keys["reader"],
    }[case]
    settings = bucket_settings(
        tiny_model, server.url, bucket_access_key_id=key_id, bucket_secret_access_key=secret
    )
    output = job(same_worker_with(store_worker, settings), "refused")
    assert set(output) == {"error"}
    assert f"the store refused the credentials ({code}, HTTP 403)" in output["error"]
    assert "BUCKET_ACCESS_KEY_ID" in output["error"] and "BUCKET_SECRET_ACCESS_KEY" in output["error"]
    assert secret not in output["error"] and key_id not in output["error"]


def test_signed_uploads_pass_a_store_that_checks_signatures(tiny_model, store_worker, strict_s3):
    server, keys = strict_s3
    key_id, secret = keys["writer"]
    settings = bucket_settings(
        tiny_model, server.url, bucket_access_key_id=key_id, bucket_secret_access_key=secret
    )
    output = job(same_worker_with(store_worker, settings), "signed", output_format="jpeg")
    assert "error" not in output, output
    stored = server.client(key_id=key_id, secret=secret).get_object(
        Bucket=BUCKET, Key=key_of(output["image_url"])
    )
    assert stored["ContentType"] == "image/jpeg"
    assert Image.open(io.BytesIO(stored["Body"].read())).format == "JPEG"
    assert sigv4_query_signature(output["image_url"], secret) in output["image_url"]


# ---------------------------------------------------------------- the worker process
def test_local_api_delivers_links_survives_a_store_outage_and_logs_no_secret(tiny_model, own_s3, tmp_path):
    env = worker_env(
        tiny_model,
        BUCKET_ENDPOINT_URL=own_s3.url,
        BUCKET_ACCESS_KEY_ID=KEY_ID,
        BUCKET_SECRET_ACCESS_KEY=SECRET,
        BUCKET_NAME=BUCKET,
    )
    with local_api(env, tmp_path / "api.log") as api:
        first = api.runsync({"prompt": "a lantern", **SMALL, "num_images": 2, "output_format": "webp"})
        assert first["status"] == "COMPLETED", first
        urls = [entry["image_url"] for entry in first["output"]["images"]]
        for url in urls:
            assert key_of(url).startswith(f"{first['id']}/")
            fetched = requests.get(url, timeout=10)
            assert fetched.status_code == 200 and fetched.headers["Content-Type"] == "image/webp"

        own_s3.stop()
        started = time.monotonic()
        down = api.runsync({"prompt": "a lantern", **SMALL})
        assert down["status"] == "FAILED" and "output" not in down
        assert down["error"].startswith("upload:") and "could not reach the store" in down["error"]
        assert time.monotonic() - started < 30  # production retry and timeout settings

        own_s3.start()
        own_s3.make_bucket()
        back = api.runsync({"prompt": "a lantern", **SMALL})
        assert back["status"] == "COMPLETED", back
        urls.append(back["output"]["image_url"])
        assert requests.get(urls[-1], timeout=10).status_code == 200
        log = api.settled_log()
    assert "storage: bucket 'zimage-test' at 127.0.0.1" in log
    assert_secret_free(log + down["error"], urls)


def test_a_bad_endpoint_stops_the_worker_process_at_start(tiny_model):
    env = worker_env(
        tiny_model,
        BUCKET_ENDPOINT_URL="ftp://images.example.com",
        BUCKET_ACCESS_KEY_ID=KEY_ID,
        BUCKET_SECRET_ACCESS_KEY=SECRET,
    )
    done = subprocess.run(
        [sys.executable, "handler.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "BUCKET_ENDPOINT_URL: 'ftp://images.example.com' is not an http(s) URL" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert_secret_free(done.stdout + done.stderr)


# ------------------------------------------------------------- providers (no network)
@pytest.mark.parametrize(
    ("endpoint", "override", "link_start", "region"),
    [
        ("https://s3.amazonaws.com", {}, "https://zimage-test.s3.amazonaws.com/job/", "us-east-1"),
        (
            "https://s3.eu-west-1.amazonaws.com",
            {},
            "https://zimage-test.s3.eu-west-1.amazonaws.com/job/",
            "eu-west-1",
        ),
        (
            "https://s3.dualstack.ap-south-1.amazonaws.com",
            {},
            "https://zimage-test.s3.dualstack.ap-south-1.amazonaws.com/job/",
            "ap-south-1",
        ),
        (
            "https://s3.eu-west-1.amazonaws.com",
            {"bucket_name": "images.example.com"},
            "https://s3.eu-west-1.amazonaws.com/images.example.com/job/",
            "eu-west-1",
        ),
        (
            "https://0123abcd.r2.cloudflarestorage.com",
            {},
            "https://0123abcd.r2.cloudflarestorage.com/zimage-test/job/",
            "auto",
        ),
        (
            "https://s3.us-west-004.backblazeb2.com",
            {},
            "https://s3.us-west-004.backblazeb2.com/zimage-test/job/",
            "us-west-004",
        ),
        ("https://storage.googleapis.com", {}, "https://storage.googleapis.com/zimage-test/job/", "auto"),
        ("http://minio.internal:9000", {}, "http://minio.internal:9000/zimage-test/job/", "us-east-1"),
        (
            "http://minio.internal:9000",
            {"bucket_region": "eu-central-1", "bucket_addressing_style": "virtual"},
            "http://zimage-test.minio.internal:9000/job/",
            "eu-central-1",
        ),
    ],
)
def test_region_and_addressing_per_provider(tiny_model, endpoint, override, link_start, region):
    storage = Storage(bucket_settings(tiny_model, endpoint, **override))
    url = storage.presign("job/0-abc.png")  # signing is local: nothing is sent
    assert url.startswith(link_start), url
    assert f"/{region}/s3/aws4_request" in dict(parse_qsl(urlsplit(url).query))["X-Amz-Credential"]


def test_region_and_addressing_rules():
    assert region_for("https://s3-us-west-2.amazonaws.com", None) == "us-west-2"
    assert region_for("https://s3.cn-north-1.amazonaws.com.cn", None) == "cn-north-1"
    assert region_for("https://s3-external-1.amazonaws.com", None) == "us-east-1"
    assert region_for("https://acct.eu.r2.cloudflarestorage.com", None) == "auto"
    assert region_for("https://s3.eu-west-1.amazonaws.com", "eu-west-3") == "eu-west-3"
    assert addressing_for("https://s3.amazonaws.com", "auto", "a.b") == "path"
    assert addressing_for("https://s3.amazonaws.com", "path", "images") == "path"
    assert addressing_for("https://storage.googleapis.com", "auto", "images") == "path"
