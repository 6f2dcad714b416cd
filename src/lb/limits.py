"""What one load-balancing worker lets in: bodies up to Runpod's 30 MB, and a bounded line of jobs.

A body is read here, not by the framework, so the cap holds for chunked bodies too. A body past
the cap is still read to its end and dropped: a server that answers and closes with unread bytes
in the socket makes the peer's TCP stack reset the connection, and most clients then report a
broken pipe instead of the 413.

Jobs: `running` run at once (MAX_CONCURRENCY, as in the queue mode), `waiting` more wait in
arrival order (asyncio's semaphore wakes its waiters first in, first out), and past that a
request is refused at once, so a burst costs no memory and the caller knows to come back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

MAX_BODY = 30 * 1024 * 1024  # Runpod's request cap on load-balancing endpoints
MAX_BODY_TEXT = "30 MB"
WAITING_PER_SLOT = 4

Receive = Callable[[], Awaitable[dict[str, Any]]]


class TooLarge(Exception):
    """The body ran past MAX_BODY; the rest of it was read and dropped."""


class Disconnected(Exception):
    """The client went away before its body arrived."""


class Full(Exception):
    """Every running and waiting place is taken."""


async def read_body(receive: Receive, cap: int = MAX_BODY) -> bytes:
    """The whole request body, or TooLarge once it passes `cap` (after draining the rest)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= cap:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()  # the part read so far is not kept while the rest drains
        if not message.get("more_body", False):
            break
    if size > cap:
        raise TooLarge
    return b"".join(chunks)


class Admission:
    """At most `running` jobs at once, `waiting` more in line; `in_flight` counts both."""

    def __init__(self, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting
        self._slots = asyncio.Semaphore(running)
        self.in_flight = 0

    def enter(self) -> None:
        """Take a place in line, or Full; every `enter` is followed by one `leave`."""
        if self.in_flight >= self.running + self.waiting:
            raise Full
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A running place, when this request's turn comes."""
        async with self._slots:
            yield
