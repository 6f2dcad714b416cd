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

    def lap(self, name: str) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + (now - self.start) * 1000, 1)
        self.start = now

    def total_ms(self) -> float:
        return round((time.perf_counter() - self.began) * 1000, 1)
