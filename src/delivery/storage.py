"""S3-compatible storage: upload each returned image and hand back a 7-day presigned GET URL.

One boto3 client per bucket's credentials (src/delivery/buckets.py): the worker's own is made
at start; a job's `s3Config` gets one made on its first job and reused by later jobs with the
same credentials, a few such kept (least recently used dropped). Works with AWS S3, Cloudflare R2, MinIO,
Backblaze B2 and Google Cloud Storage's XML API:
- region (what SigV4 signs with): `BUCKET_REGION`, else the one in an AWS or B2 endpoint
  host, `auto` for R2 and GCS (what their own SDK examples and Google's signers use), else
  `us-east-1` (MinIO's default; stores without regions ignore it);
- addressing: virtual-hosted on amazonaws.com (AWS's preferred style), path-style elsewhere
  (what MinIO needs and the others accept); `BUCKET_ADDRESSING_STYLE` overrides it;
- checksums: boto3 >= 1.36 adds a CRC32 checksum to every upload by default (sent as an
  aws-chunked trailer), which R2, B2, GCS and older MinIO reject; `when_required` restores
  the pre-1.36 requests, which every store accepts;
- retries: boto3's `standard` mode (exponential backoff with jitter), a bounded number of
  attempts and connect/read timeouts, so a dead store fails the job in about a second and
  a store that accepts connections but never answers fails it in well under a minute.

A job's images are either all stored and linked, or the job fails with a message that
says why; objects already written for a failed job are removed.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from src.delivery.buckets import Bucket
from src.delivery.encoding import MIME_TYPES
from src.runtime.errors import JobError
from src.runtime.gpu import JobStopped, Stop
from src.runtime.settings import Settings

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 7 * 24 * 3600  # the SigV4 maximum, and the hosted endpoint's link lifetime
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

# A region inside an AWS endpoint host: s3.eu-west-1.amazonaws.com, s3-us-west-2.amazonaws.com,
# s3.dualstack.ap-south-1.amazonaws.com, s3.cn-north-1.amazonaws.com.cn. s3.amazonaws.com has none.
_AWS_REGION = re.compile(r"(?:^|[.-])([a-z]{2}(?:-[a-z]+)+-\d+)\.amazonaws\.com(?:\.cn)?$")
_B2_REGION = re.compile(r"(?:^|\.)s3\.([a-z]{2}-[a-z]+-\d+)\.backblazeb2\.com$")
# S3 error codes that mean "these credentials may not do this", whatever the store calls it.
_REFUSED = {
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "SignatureDoesNotMatch",
    "Unauthorized",
    "403",
}
# Codes that mean the region the request was signed for is not the bucket's.
_WRONG_REGION = {"AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException"}


def region_for(endpoint_url: str, setting: str | None) -> str:
    """The region SigV4 signs with: BUCKET_REGION, else one the endpoint host implies."""
    if setting:
        return setting
    host = (urlparse(endpoint_url).hostname or "").lower()
    for pattern in (_AWS_REGION, _B2_REGION):
        if match := pattern.search(host):
            return match[1]
    if host.endswith("r2.cloudflarestorage.com") or host.endswith("storage.googleapis.com"):
        return "auto"
    return "us-east-1"


def addressing_for(endpoint_url: str, setting: str, bucket: str) -> str:
    """'path' or 'virtual': BUCKET_ADDRESSING_STYLE, else what the endpoint needs."""
    if setting in ("path", "virtual"):
        return setting
    host = (urlparse(endpoint_url).hostname or "").lower()
    # A dotted bucket name as a host label breaks the store's wildcard TLS certificate.
    on_aws = host.endswith("amazonaws.com") or host.endswith("amazonaws.com.cn")
    return "virtual" if on_aws and "." not in bucket else "path"


class Storage:
    # Production bounds, as class attributes so tests can shorten them for a failure case.
    max_attempts = 3  # boto3 `standard` mode: one try and two retries, with jittered backoff
    connect_timeout = 5.0  # seconds to open a connection
    read_timeout = 15.0  # seconds a socket may wait on the store; a 1024x1024 PNG is a few MB
    upload_threads = 4  # num_images is at most 4: one thread each, so they go up together

    def __init__(self, target: Settings | Bucket) -> None:
        credentials = target if isinstance(target, Bucket) else Bucket.of(target)
        endpoint = credentials.endpoint_url
        parsed = urlparse(endpoint)
        self.bucket = credentials.name
        self.names = credentials.names
        # Only host and port are ever shown: a URL could carry user:password@.
        self.host = f"{parsed.hostname}:{parsed.port}" if parsed.port else str(parsed.hostname)
        region = region_for(endpoint, credentials.region)
        addressing = addressing_for(endpoint, credentials.addressing_style, self.bucket)
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            region_name=region,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": addressing},
                # total_max_attempts counts the first try; botocore's `max_attempts` counts only retries.
                retries={"mode": "standard", "total_max_attempts": self.max_attempts},
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=self.upload_threads,
            ),
        )
        self.pool = ThreadPoolExecutor(max_workers=self.upload_threads, thread_name_prefix="upload")
        log.info("storage: bucket %r at %s (region %s, %s-style)", self.bucket, self.host, region, addressing)

    def upload_all(
        self, job_id: str, images: list[bytes], output_format: str, stop: Stop | None = None
    ) -> list[str]:
        """Store every image (in parallel) and return their presigned URLs, or raise JobError.

        A job stopped while its images go up leaves nothing behind: what was stored is removed."""
        keys = [object_key(job_id, i, output_format) for i in range(len(images))]
        futures = [
            self.pool.submit(self._put, key, data, output_format)
            for key, data in zip(keys, images, strict=True)
        ]
        errors = [future.exception() for future in futures]
        failed = [err for err in errors if err is not None]
        if failed:
            for err in failed:
                log.warning("job %s: upload to bucket %r failed: %s", job_id, self.bucket, err)
            self._delete_quietly([key for key, err in zip(keys, errors, strict=True) if err is None])
            raise JobError(
                f"upload: storing {len(failed)} of {len(images)} image(s) in bucket '{self.bucket}' "
                f"at {self.host} failed: {self._describe(failed[0])}. No image was returned."
            )
        if stop is not None and stop.is_set():
            self._delete_quietly(keys)
            raise JobStopped
        return [self.presign(key) for key in keys]

    def presign(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )

    def _put(self, key: str, data: bytes, output_format: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=MIME_TYPES[output_format])

    def _delete_quietly(self, keys: list[str]) -> None:
        """Remove what a failed job did store; a leftover object is logged, never linked."""
        for key in keys:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except (BotoCoreError, ClientError) as err:
                log.warning("storage: could not remove %s after a failed job: %s", key, err)

    def _describe(self, err: BaseException) -> str:
        """A short, secret-free cause with what to check. botocore's own texts carry no secret,
        but only the S3 error code and exception name are passed on to the caller."""
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", "error"))
            meta = err.response.get("ResponseMetadata", {})
            what = f"{code}, HTTP {meta.get('HTTPStatusCode', '?')}"
            attempts = meta.get("RetryAttempts", 0) + 1
            names = self.names
            if code == "NoSuchBucket":
                return f"the bucket does not exist ({what}); create it or set {names.bucket} to one that does"
            if code in _REFUSED:
                return (
                    f"the store refused the credentials ({what}); check {names.key_id} and "
                    f"{names.secret}, and that the key may write to this bucket"
                )
            if code in _WRONG_REGION:
                return f"the bucket is in another region ({what}); {names.region_fix}"
            return f"the store answered {what} after {attempts} attempt(s)"
        if isinstance(err, (ConnectTimeoutError, ReadTimeoutError)):
            return (
                f"the store did not answer in time ({type(err).__name__}, up to {self.max_attempts} "
                f"attempts); check that {self.names.endpoint} is reachable from the worker"
            )
        if isinstance(err, BotoCoreError):
            return (
                f"could not reach the store ({type(err).__name__}, up to {self.max_attempts} attempts); "
                f"check {self.names.endpoint} and that the store is up"
            )
        return f"unexpected {type(err).__name__}"


class Storages:
    """One Storage per job bucket's credentials, reused by every job with the same ones.

    A client is worth keeping (boto3 builds one in tens of milliseconds, and its connections
    stay open between jobs), but one endpoint may serve many customers: past `bound`
    credentials the least recently used is dropped (its threads end once no job holds it).
    """

    def __init__(self, bound: int = 8) -> None:
        self.bound = bound
        self._clients: OrderedDict[Bucket, Storage] = OrderedDict()
        self._lock = threading.Lock()  # jobs deliver on I/O threads

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, bucket: Bucket) -> Storage:
        with self._lock:
            storage = self._clients.pop(bucket, None) or Storage(bucket)
            self._clients[bucket] = storage
            while len(self._clients) > self.bound:
                self._clients.popitem(last=False)
            return storage


def object_key(job_id: str, index: int, output_format: str) -> str:
    """Job id, image index and a random part: nothing the caller typed reaches the key."""
    safe_id = re.sub(r"[^A-Za-z0-9_-]", "", job_id)[:64] or "job"
    return f"{safe_id}/{index}-{uuid.uuid4().hex}.{EXTENSIONS[output_format]}"
