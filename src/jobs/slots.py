"""Which jobs hold a slot: those waiting for the GPU or on it, not those delivering.

With MAX_CONCURRENCY slots, a slot held by a job that is only encoding and uploading keeps the
next job from being taken while the GPU finishes the one before it: with a distant bucket
(+200 ms per upload) the GPU then sat idle a third of the time. So a job that has left the GPU
stage gives its slot back, for at most `bound` such jobs at once (past that, a delivering job
keeps its slot), which keeps the finished images waiting in memory bounded: at most
MAX_CONCURRENCY + bound jobs are in flight, each with at most 4 images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Delivery:
    """Counts the jobs past the GPU stage; the job loop asks how many slots they free.

    Used from the event loop only (the handler and the job loop share it), so no lock.
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.jobs = 0
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def freed(self) -> int:
        """Slots given back by delivering jobs."""
        return min(self.jobs, self.bound)

    @contextmanager
    def delivering(self) -> Iterator[None]:
        """Around a job's encoding and upload: its slot is free for the next job meanwhile."""
        self._change(+1)
        try:
            yield
        finally:
            self._change(-1)

    def _change(self, step: int) -> None:
        self.jobs += step
        for listener in self._listeners:
            listener()
