"""Downloads from a caller's URL (input pictures, LoRA files): one SSRF-safe, capped stream
with one set of error messages, and URLs shown without their query (tokens, signatures)."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import ParseResult, urlsplit

from requests import RequestException, Response
from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, resolve_and_validate, safe_get

from src.runtime.errors import JobError

USER_AGENT = "zimage-turbo-worker (+https://github.com/runpod-workers)"


def shut(response: Response) -> None:
    """End a download from the watchdog thread: shutdown wakes a blocked read, close would not."""
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def without_query(text: str) -> str:
    """URLs as they may appear in a message: a presigned input URL's signature stays out."""

    def strip(match: re.Match[str]) -> str:
        parts = urlsplit(match[0])
        path = parts.path if len(parts.path) <= 80 else parts.path[:77] + "..."
        return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{path}"

    return re.sub(r"https?://[^\s'\"]+", strip, text)


def check_public_host(url: ParseResult, field: str) -> None:
    """A caller's URL that this worker will connect to itself (a job's storage endpoint), held to
    the downloads' rule: every address its host resolves to is public, unless
    RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1 (the SDK's check, which reads that switch)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        resolve_and_validate(url.hostname or "", port)
    except SSRFError as err:
        reason = f"{without_query(str(err))}; use a public one"
        raise JobError(f"{field}: {url.scheme}://{url.hostname} is refused: {reason}") from None


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    seconds: float  # for the whole download, however the host paces it
    cap: str  # the size cap as errors name it, e.g. "the 32 MiB cap"
    read_timeout: float = 10.0
    chunk_bytes: int = 1 << 16


def stream(url: str, field: str, shown: str, limits: Limits) -> Iterator[bytes]:
    """The body of a public URL in chunks, within `limits`; every failure is a JobError that
    names `field` and the cap or step (`shown` is the URL as errors may show it).

    The Runpod SDK's `safe_get` refuses private addresses and re-checks every redirect. A
    host that sends a byte every few seconds never trips a read timeout, so a watchdog shuts
    the socket at the deadline.
    """
    deadline = time.monotonic() + limits.seconds
    too_slow = f"{field}: fetching {shown} took over {limits.seconds:g} s"
    try:
        with safe_get(
            url,
            timeout=(5, limits.read_timeout),
            max_bytes=limits.max_bytes,
            headers={"User-Agent": USER_AGENT},
        ) as response:
            if response.status_code >= 400:
                raise JobError(f"{field}: fetching {shown} failed with HTTP {response.status_code}")
            watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), shut, args=(response,))
            watchdog.daemon = True
            watchdog.start()
            try:
                yield from iter_content_capped(response, limits.chunk_bytes, limits.max_bytes)
            finally:
                watchdog.cancel()
            if time.monotonic() > deadline:
                raise JobError(too_slow)
    except SSRFError as err:
        reason = without_query(str(err))
        if "size cap" in reason:
            raise JobError(f"{field}: {shown} is over {limits.cap}") from None
        raise JobError(f"{field}: {shown} is refused: {reason}") from None
    except RequestException as err:
        if time.monotonic() > deadline:
            raise JobError(too_slow) from None
        kind = "timed out" if "timeout" in type(err).__name__.lower() else "could not be fetched"
        raise JobError(f"{field}: {shown} {kind} ({type(err).__name__})") from None
