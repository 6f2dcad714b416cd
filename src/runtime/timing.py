"""Stage timings in milliseconds, as `timings` in the response reports them."""

from __future__ import annotations

import time

import torch


class Stopwatch:
    """Laps in ms; waits for the GPU at each lap so a stage is not billed to the next one."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self.start = self.began = time.perf_counter()

    def lap(self, name: str, *, sync: bool = True) -> None:
        """`sync=False` off the GPU thread: there, waiting for the GPU would wait for another
        job's kernels (and block the event loop for as long)."""
        if sync and self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + (now - self.start) * 1000, 1)
        self.start = now

    def add(self, name: str, ms: float) -> None:
        """Time measured elsewhere (stages that ran side by side), added to `name`."""
        self.timings[name] = round(self.timings.get(name, 0.0) + ms, 1)

    def move(self, source: str, name: str, ms: float) -> None:
        """Time already added to `source` that belongs to `name` (a stage inside another one)."""
        self.timings[source] = round(self.timings.get(source, 0.0) - ms, 1)
        self.add(name, ms)

    def restart(self) -> None:
        """The next lap starts now; the time since the last one is in no stage."""
        self.start = time.perf_counter()

    def total_ms(self) -> float:
        return round((time.perf_counter() - self.began) * 1000, 1)
