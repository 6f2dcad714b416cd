"""What every download from a caller's URL shares (input pictures, LoRA files): the user agent,
the watchdog's way to end a stalled read, and URLs shown without their query (tokens)."""

from __future__ import annotations

import contextlib
import re
import socket
from urllib.parse import urlsplit

from requests import Response

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
