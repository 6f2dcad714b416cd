"""A job's own bucket: Runpod's top-level `s3Config`, against one S3 server on loopback.

The server (moto, tests/loopback_servers.py) holds two buckets: the worker's (its BUCKET_*
settings) and a customer's, reached with the customer's own keys. Jobs arrive the real ways:
through the deployed job loop (`python handler.py` against the loopback job queue, where the
SDK hands the handler the whole job), through the in-process worker's handler, and through a
load-balancing worker's /runsync. Signatures are checked with tests/test_storage.py's SigV4.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from PIL import Image

from src.delivery.buckets import S3_CONFIG, Bucket
from src.delivery.storage import Storages
from tests.conftest import handle_job
from tests.load_balancer import InProcessLB, wait_until
from tests.loopback_servers import BUCKET, KEY_ID, SECRET, JobQueue, MotoServer
from tests.test_job_loop import START_SECONDS, deployed
from tests.test_storage import sigv4_query_signature

CUSTOMER_BUCKET = "customer-images"
CUSTOMER_KEY = "AKIACUSTOMERKEY00042"
CUSTOMER_SECRET = "customer-secret-Vb71Qx0pLm"
CUSTOMER = (CUSTOMER_BUCKET, CUSTOMER_KEY, CUSTOMER_SECRET)
SMALL = {"prompt": "a paper boat", "size": "256*256", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def store() -> Iterator[MotoServer]:
    server = MotoServer()
    server.make_bucket(BUCKET)  # the worker's
    server.make_bucket(CUSTOMER_BUCKET)
    yield server
    server.stop()


def s3_config(store: MotoServer, **override: str) -> dict[str, str]:
    config = {
        "accessId": CUSTOMER_KEY,
        "accessSecret": CUSTOMER_SECRET,
        "bucketName": CUSTOMER_BUCKET,
        "endpointUrl": store.url,
    }
    return {key: value for key, value in {**config, **override}.items() if value is not None}


def check_link(url: str, store: MotoServer, bucket: str, key_id: str, secret: str) -> None:
    """A 7-day SigV4 link into `bucket`, signed with `key_id`/`secret`, that fetches a PNG."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert f"{parts.scheme}://{parts.netloc}" == store.url and parts.path.startswith(f"/{bucket}/"), url
    assert query["X-Amz-Credential"].startswith(f"{key_id}/") and query["X-Amz-Expires"] == "604800"
    assert query["X-Amz-Signature"] == sigv4_query_signature(url, secret)
    fetched = requests.get(url, timeout=10)
    assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).format == "PNG"


def test_deployed_jobs_go_to_their_own_bucket_or_the_worker_s_never_falling_back(tiny_model, store, tmp_path):
    jobs = [
        {"id": "own-1", "input": {**SMALL, "seed": 1}, "s3Config": s3_config(store)},
        {"id": "plain", "input": {**SMALL, "seed": 1}},
        {"id": "own-2", "input": {**SMALL, "seed": 2}, "s3Config": s3_config(store)},
        {"id": "no-secret", "input": SMALL, "s3Config": s3_config(store, accessSecret=None)},
        {"id": "refused", "input": SMALL, "s3Config": s3_config(store, bucketName="no-such-bucket")},
    ]
    queue = JobQueue(jobs)
    bucket = {
        "BUCKET_ENDPOINT_URL": store.url,
        "BUCKET_ACCESS_KEY_ID": KEY_ID,
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
        "BUCKET_NAME": BUCKET,
        "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "1",  # the store is on 127.0.0.1
    }
    log = tmp_path / "worker.log"
    try:
        with deployed(queue, tiny_model, log, MAX_CONCURRENCY="1", **bucket):
            assert queue.wait_for([job["id"] for job in jobs], START_SECONDS + 60), log.read_text()[-3000:]
    finally:
        queue.close()
    results = queue.results
    for job_id in ("own-1", "own-2"):
        check_link(
            results[job_id]["output"]["image_url"], store, CUSTOMER_BUCKET, CUSTOMER_KEY, CUSTOMER_SECRET
        )
    check_link(results["plain"]["output"]["image_url"], store, BUCKET, KEY_ID, SECRET)
    # The same pixels whichever bucket holds them.
    own = requests.get(results["own-1"]["output"]["image_url"], timeout=10).content
    assert own == requests.get(results["plain"]["output"]["image_url"], timeout=10).content

    assert "output" not in results["no-secret"]
    assert results["no-secret"]["error"].startswith("s3Config.accessSecret: missing: a job's s3Config needs")
    refused = results["refused"]
    assert "output" not in refused, refused  # no data URI, no link into the worker's bucket
    assert refused["error"].startswith("upload: storing 1 of 1 image(s) in bucket 'no-such-bucket'")
    assert "set s3Config.bucketName to one that does" in refused["error"]
    assert store.keys("", bucket=BUCKET) == [
        urlsplit(results["plain"]["output"]["image_url"]).path.split("/", 2)[2]
    ]
    assert [key.split("/")[0] for key in store.keys("", bucket=CUSTOMER_BUCKET)] == ["own-1", "own-2"]

    text = log.read_text() + json.dumps(results)
    assert CUSTOMER_SECRET not in text and SECRET not in text
    assert CUSTOMER_KEY not in log.read_text() and KEY_ID not in log.read_text()
    for job_id in ("own-1", "own-2", "plain"):
        signature = dict(parse_qsl(urlsplit(results[job_id]["output"]["image_url"]).query))["X-Amz-Signature"]
        assert signature not in log.read_text()
    assert "All fitness checks passed" in log.read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"accessId": None}, "s3Config.accessId: missing:"),
        ({"accessSecret": ""}, "s3Config.accessSecret: empty:"),
        ({"bucketName": 7}, "s3Config.bucketName: a int is not allowed:"),
        ({"bucketName": "Bad_Bucket!"}, "s3Config.bucketName: 'Bad_Bucket!' is not a bucket name"),
        ({"endpointUrl": None}, "s3Config.endpointUrl: missing:"),
        (
            {"endpointUrl": "ftp://files.example.com"},
            "s3Config.endpointUrl: 'ftp://files.example.com' is not",
        ),
        (
            {"endpointUrl": f"https://{CUSTOMER_KEY}:{CUSTOMER_SECRET}@s3.example.com"},
            "s3Config.endpointUrl: ",
        ),
        ({"endpointUrl": "http://127.0.0.1:9000"}, "s3Config.endpointUrl: http://127.0.0.1 is refused:"),
        ({"endpointUrl": "http://10.1.2.3"}, "s3Config.endpointUrl: http://10.1.2.3 is refused:"),
        (
            {"endpointUrl": "http://169.254.169.254"},
            "s3Config.endpointUrl: http://169.254.169.254 is refused:",
        ),
        ({"endpointUrl": "https://localhost"}, "s3Config.endpointUrl: https://localhost is refused:"),
    ],
)
def test_a_bad_s3config_fails_the_job_naming_its_key(worker, store, monkeypatch, override, message):
    monkeypatch.delenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", raising=False)  # production's rule
    output = handle_job(worker, {"id": "bad", "input": SMALL, "s3Config": s3_config(store, **override)})
    assert set(output) == {"error"} and output["error"].startswith(message), output
    assert CUSTOMER_SECRET not in output["error"] and CUSTOMER_KEY not in output["error"]


def test_s3config_that_is_not_an_object_is_refused(worker):
    output = handle_job(worker, {"id": "list", "input": SMALL, "s3Config": ["key", "secret"]})
    assert output == {
        "error": "s3Config: a list is not allowed: send an object with accessId, accessSecret, bucketName, "
        "endpointUrl"
    }


def test_one_client_per_credentials_reused_and_a_few_kept(worker, store, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    first = handle_job(worker, {"id": "reuse-1", "input": SMALL, "s3Config": s3_config(store)})
    storage, clients = worker.storages.get(bucket_of(store)), len(worker.storages)
    second = handle_job(worker, {"id": "reuse-2", "input": SMALL, "s3Config": s3_config(store)})
    assert "error" not in first and "error" not in second, (first, second)
    assert worker.storages.get(bucket_of(store)) is storage and len(worker.storages) == clients
    # The worker itself has no bucket: a job without s3Config still gets a data URI.
    assert handle_job(worker, {"id": "inline", "input": SMALL})["image_url"].startswith("data:image/png")

    few = Storages(bound=2)
    a, b, c = (bucket_of(store, key=f"AKIAOTHER{i:011d}") for i in range(3))
    kept_a = few.get(a)
    few.get(b)
    assert few.get(a) is kept_a  # used again: now the most recent
    few.get(c)  # b, the least recently used, goes
    assert len(few) == 2 and few.get(a) is kept_a


def bucket_of(store: MotoServer, key: str = CUSTOMER_KEY) -> Bucket:
    return Bucket(store.url, CUSTOMER_BUCKET, key, CUSTOMER_SECRET, names=S3_CONFIG)


def test_the_bucket_s_secrets_stay_out_of_its_repr(store):
    shown = repr(bucket_of(store))
    assert CUSTOMER_SECRET not in shown and CUSTOMER_KEY not in shown and CUSTOMER_BUCKET in shown


def test_the_log_redacts_the_recent_jobs_keys_and_the_worker_s_own_for_good():
    from src.runtime import logs

    logs.add_secret("worker-own-secret-0001")
    keys = [f"job-secret-{i:04d}" for i in range(logs.JOB_SECRETS_KEPT + 36)]
    for key in keys:
        logs.add_secret(key, job=True)
    line = " ".join(["worker-own-secret-0001", *keys])
    shown = logs.redact(line).split()
    assert shown[0] == "<redacted>"  # the settings' keys stay redacted however many jobs came
    assert shown[1:37] == keys[:36]  # the oldest job keys are no longer checked: a bounded list
    assert set(shown[37:]) == {"<redacted>"}  # every job in flight is among the recent 64


def test_a_load_balancing_runsync_takes_s3config_beside_input(worker, store, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    server = InProcessLB(lambda: worker, max_concurrency=1)
    try:
        wait_until(lambda: requests.get(f"{server.url}/ping", timeout=5).status_code == 200, "ready")
        body = {"input": {**SMALL, "seed": 4}, "s3Config": s3_config(store)}
        stored = requests.post(f"{server.url}/runsync", json=body, timeout=120)
        assert stored.status_code == 200 and stored.json()["status"] == "COMPLETED", stored.text[:500]
        check_link(
            stored.json()["output"]["image_url"], store, CUSTOMER_BUCKET, CUSTOMER_KEY, CUSTOMER_SECRET
        )
        body["s3Config"] = s3_config(store, accessId=None)
        refused = requests.post(f"{server.url}/runsync", json=body, timeout=120)
        assert refused.status_code == 400 and refused.json()["status"] == "FAILED"
        assert refused.json()["error"].startswith("s3Config.accessId: missing:")
        assert CUSTOMER_SECRET not in refused.text
    finally:
        assert server.close() == 0


def test_the_docs_examples_are_valid_jobs_with_every_s3config_key():
    from src.delivery.buckets import S3_CONFIG_KEYS
    from src.request.parse import parse_request
    from tests.conftest import ROOT

    reference = (ROOT / "docs" / "reference.md").read_text()
    storage = (ROOT / "docs" / "storage.md").read_text()
    examples = [
        json.loads(line)
        for line in reference.splitlines()
        if line.startswith('{"input"') and "s3Config" in line
    ]
    examples += [
        json.loads(block) for block in re.findall(r"```json\n(\{\n.*?\n\})\n```", storage, re.DOTALL)
    ]
    assert len(examples) == 2
    for example in examples:
        parse_request(example["input"])
        assert list(example["s3Config"]) == list(S3_CONFIG_KEYS)
