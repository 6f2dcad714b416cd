"""Which bucket a job's images go to: the worker's `BUCKET_*` settings, or the job's own `s3Config`.

Runpod's API takes `s3Config` at the top level of a job, beside `input`
(`{"accessId", "accessSecret", "bucketName", "endpointUrl"}`), and hands it to the worker with
the job: one endpoint serves many customers, each with their own bucket and keys. Both sources
become one `Bucket`, the credentials delivery stores with; each knows the names its own
messages use (a job's caller fixes `s3Config.accessId`, an operator `BUCKET_ACCESS_KEY_ID`).

The endpoint of a job's bucket is the caller's URL, so it obeys the download rules
(src/inputs/downloads.py): public addresses only, unless RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1.
The keys are registered for redaction the moment they arrive (src/runtime/logs.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import ParseResult, urlparse

from src.inputs.downloads import check_public_host
from src.runtime.errors import JobError
from src.runtime.logs import add_secret
from src.runtime.settings import Settings

BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Names:
    """What the messages call each part, so a failure says what to fix where it is set."""

    endpoint: str
    key_id: str
    secret: str
    bucket: str
    region_fix: str  # what to do when the bucket is in another region


SETTINGS = Names(
    "BUCKET_ENDPOINT_URL",
    "BUCKET_ACCESS_KEY_ID",
    "BUCKET_SECRET_ACCESS_KEY",
    "BUCKET_NAME",
    "set BUCKET_REGION to the bucket's region",
)
S3_CONFIG = Names(
    "s3Config.endpointUrl",
    "s3Config.accessId",
    "s3Config.accessSecret",
    "s3Config.bucketName",
    "send an s3Config.endpointUrl in the bucket's region",
)
# s3Config's keys, in the order a missing one is reported, and the Bucket field each fills.
S3_CONFIG_KEYS = {
    "accessId": "access_key_id",
    "accessSecret": "secret_access_key",
    "bucketName": "name",
    "endpointUrl": "endpoint_url",
}


@dataclass(frozen=True)
class Bucket:
    """The credentials a storage client is made from; equal credentials share one client."""

    endpoint_url: str
    name: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str | None = None  # None: from the endpoint host (src/delivery/storage.py)
    addressing_style: str = "auto"
    names: Names = SETTINGS

    @classmethod
    def of(cls, settings: Settings) -> Bucket:
        """The worker's own bucket, from its BUCKET_* settings (checked in Settings.from_env)."""
        return cls(
            endpoint_url=settings.bucket_endpoint_url or "",
            name=settings.bucket_name,
            access_key_id=settings.bucket_access_key_id or "",
            secret_access_key=settings.bucket_secret_access_key or "",
            region=settings.bucket_region,
            addressing_style=settings.bucket_addressing_style,
        )


def job_bucket(s3_config: Any) -> Bucket:
    """A job's `s3Config` as a Bucket, or a JobError naming `s3Config.<key>`.

    Blocking: the endpoint's host is resolved, to refuse private addresses (run it off the loop).
    Keys other than the four are ignored, so a field Runpod adds later cannot fail every job.
    """
    if not isinstance(s3_config, dict):
        raise JobError(
            f"s3Config: a {type(s3_config).__name__} is not allowed: send an object with "
            + ", ".join(S3_CONFIG_KEYS)
        )
    values: dict[str, str] = {}
    for key, attribute in S3_CONFIG_KEYS.items():
        value = s3_config.get(key)
        if not isinstance(value, str) or not value.strip():
            raise JobError(
                f"s3Config.{key}: {_arrived(value)}: a job's s3Config needs "
                f"{', '.join(S3_CONFIG_KEYS)} as non-empty strings"
            )
        values[attribute] = value.strip()
    # Before anything can fail and be logged with them.
    add_secret(values["access_key_id"], job=True)
    add_secret(values["secret_access_key"], job=True)
    if not BUCKET_NAME.fullmatch(values["name"]):
        raise JobError(
            f"s3Config.bucketName: {values['name'][:70]!r} is not a bucket name: use 3 to 63 lowercase "
            "letters, digits, dots and hyphens, starting and ending with a letter or digit"
        )
    endpoint = values["endpoint_url"]
    parsed = urlparse(endpoint)
    # Credentials in the URL would end up in botocore's connection-error messages.
    if not _plain_http_url(parsed):
        shown = f"{parsed.scheme}://{parsed.netloc.rsplit('@', 1)[-1]}"[:80]
        raise JobError(
            f"s3Config.endpointUrl: {shown!r} is not allowed: use an https (or http) URL without "
            "credentials in it, e.g. https://<account>.r2.cloudflarestorage.com"
        )
    check_public_host(parsed, "s3Config.endpointUrl")
    return Bucket(**values, names=S3_CONFIG)


def _arrived(value: Any) -> str:
    """What came instead of a key's string, without showing it (it may be a secret)."""
    if value is None:
        return "missing"
    return "empty" if isinstance(value, str) else f"a {type(value).__name__} is not allowed"


def _plain_http_url(url: ParseResult) -> bool:
    """http(s), a host, a valid port and no user:password@ in it."""
    try:
        url.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname) and "@" not in url.netloc
