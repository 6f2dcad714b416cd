"""S3-compatible storage: upload each returned image and hand back a 7-day presigned GET URL.

One boto3 client per worker, made at start. Works with AWS S3, Cloudflare R2, MinIO,
Backblaze B2 and Google Cloud Storage's XML API:
- addressing: virtual-hosted on amazonaws.com, path-style elsewhere (what MinIO needs and
  the others accept); `BUCKET_ADDRESSING_STYLE` overrides it;
- checksums: boto3 >= 1.36 sends CRC32 checksums on every upload by default, which
  several S3-compatible stores reject; `when_required` restores the older behaviour;
- retries: boto3's `standard` mode (exponential backoff with jitter), bounded attempts,
  connect and read timeouts, so a dead store fails the job in seconds, not minutes.
"""

from __future__ import annotations

import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from src.errors import JobError
from src.output_image import MIME_TYPES
from src.settings import Settings

log = logging.getLogger(__name__)

PRESIGN_SECONDS = 7 * 24 * 3600  # the SigV4 maximum, and the hosted endpoint's link lifetime
MAX_ATTEMPTS = 4
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def region_for(endpoint_url: str, setting: str | None) -> str:
    """SigV4 signs with a region: BUCKET_REGION, else the one in an AWS/B2 host, else a default."""
    if setting:
        return setting
    host = urlparse(endpoint_url).hostname or ""
    match = re.search(r"s3[.-]([a-z0-9-]+)\.(amazonaws\.com|backblazeb2\.com)$", host)
    if match and match[1] != "external-1":
        return match[1]
    return "auto" if host.endswith("r2.cloudflarestorage.com") else "us-east-1"


def addressing_for(endpoint_url: str, setting: str) -> str:
    if setting in ("path", "virtual"):
        return setting
    host = urlparse(endpoint_url).hostname or ""
    return "virtual" if host.endswith("amazonaws.com") else "path"


class Storage:
    def __init__(self, settings: Settings) -> None:
        endpoint = settings.bucket_endpoint_url or ""
        self.bucket = settings.bucket_name
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=settings.bucket_access_key_id,
            aws_secret_access_key=settings.bucket_secret_access_key,
            region_name=region_for(endpoint, settings.bucket_region),
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": addressing_for(endpoint, settings.bucket_addressing_style)},
                retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
                connect_timeout=5,
                read_timeout=30,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="upload")
        log.info("storage: bucket %r at %s", self.bucket, urlparse(endpoint).netloc)

    def upload_all(self, job_id: str, images: list[bytes], output_format: str) -> list[str]:
        """Store every image (in parallel) and return their presigned URLs, or raise JobError.

        Either all are stored or the job fails; objects already written for a failed
        job are deleted so nothing half-done is left behind.
        """
        keys = [object_key(job_id, i, output_format) for i in range(len(images))]
        futures = [
            self.pool.submit(self._put, key, data, output_format)
            for key, data in zip(keys, images, strict=True)
        ]
        errors = [future.exception() for future in futures]
        failed = [err for err in errors if err is not None]
        if failed:
            stored = [key for key, err in zip(keys, errors, strict=True) if err is None]
            self._delete_quietly(stored)
            raise JobError(
                f"upload: storing {len(failed)} of {len(images)} images in bucket '{self.bucket}' failed "
                f"after {MAX_ATTEMPTS} attempts ({_reason(failed[0])}); no image was returned. "
                "Check the BUCKET_* settings and that the store is reachable."
            )
        return [self.presign(key) for key in keys]

    def presign(self, key: str) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS
        )

    def _put(self, key: str, data: bytes, output_format: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=MIME_TYPES[output_format])

    def _delete_quietly(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except (BotoCoreError, ClientError) as err:
                log.warning("storage: could not remove %s after a failed job: %s", key, _reason(err))


def object_key(job_id: str, index: int, output_format: str) -> str:
    """Job id, image index and a random part: nothing the caller typed reaches the key."""
    safe_id = re.sub(r"[^A-Za-z0-9_-]", "", job_id)[:64] or "job"
    return f"{safe_id}/{index}-{uuid.uuid4().hex}.{EXTENSIONS[output_format]}"


def _reason(err: BaseException) -> str:
    """A short, secret-free cause: the S3 error code, or the exception type."""
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "error")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{code}, HTTP {status}" if status else str(code)
    return type(err).__name__
