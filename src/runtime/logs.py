"""Logging at INFO by default, with image data, signatures and secrets redacted.

The Runpod SDK logs at DEBUG unless told otherwise, and then prints every job's whole
input and output; even at INFO its local runner prints the whole result. Every line,
ours and the SDK's, goes through `redact` so no base64 image, presigned signature or
storage credential reaches the log.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import OrderedDict

_SECRETS: set[str] = set()  # the worker's own (settings): for good
# Jobs' own keys (`s3Config`): the most recent ones, so a worker serving many callers does not
# check every log line against every key it has ever seen. A job's two keys are added as it
# arrives; at most 2 x MAX_CONCURRENCY (16) jobs are in flight, so theirs are always among these.
_JOB_SECRETS: OrderedDict[str, None] = OrderedDict()
JOB_SECRETS_KEPT = 64
_DATA_URI = re.compile(r"(data:[\w/.+-]+;base64,)([A-Za-z0-9+/=]{16,})")
_LONG_BASE64 = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")
_SIGNED_PARAMS = re.compile(
    # token/api_key: LoRA download links (Civitai, Hugging Face) carry them in the query.
    r"((?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|token|api_key)=)"
    r"[^&\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    text = _DATA_URI.sub(lambda m: f"{m[1]}<{len(m[2])} chars>", text)
    text = _LONG_BASE64.sub(lambda m: f"<base64, {len(m[0])} chars>", text)
    text = _SIGNED_PARAMS.sub(r"\1<redacted>", text)
    for secret in (*_SECRETS, *_JOB_SECRETS):
        text = text.replace(secret, "<redacted>")
    return text


def add_secret(value: str | None, job: bool = False) -> None:
    """A value that must never be logged (storage keys); `job`: one job's, kept among the recent ones."""
    if not value or len(value) < 4:
        return
    if not job:
        _SECRETS.add(value)
        return
    _JOB_SECRETS[value] = None
    _JOB_SECRETS.move_to_end(value)
    while len(_JOB_SECRETS) > JOB_SECRETS_KEPT:
        _JOB_SECRETS.popitem(last=False)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


def configure_logging() -> None:
    level = os.environ.get("RUNPOD_LOG_LEVEL") or os.environ.get("RUNPOD_DEBUG_LEVEL") or "INFO"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)-7s| %(name)s | %(message)s"))
    handler.addFilter(_RedactingFilter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("src").setLevel(level.upper() if level.upper() in logging._nameToLevel else "INFO")
    for noisy in ("httpx", "botocore", "boto3", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import diffusers
    import transformers
    from runpod.serverless.modules.rp_logger import RunPodLogger

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    runpod_logger = RunPodLogger()
    runpod_logger.set_level(level.upper())
    if not getattr(RunPodLogger.log, "redacting", False):
        original = RunPodLogger.log

        def log(self, message, message_level="INFO", job_id=None):
            return original(self, redact(str(message)), message_level, job_id)

        log.redacting = True
        RunPodLogger.log = log
