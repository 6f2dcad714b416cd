"""Where some weights live between uses: on the device throughout, or in CPU memory and brought
to the device for each use (the `offload` memory plan moves the text encoder this way).

Moving a module moves its Parameter objects' data in place, so a part that shares Parameters
with another (the expander with the text encoder) moves with it, never as a second copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

HOST = torch.device("cpu")


class Residence:
    def __init__(self, modules: list[torch.nn.Module], device: torch.device, offloaded: bool) -> None:
        self.modules, self.device, self.offloaded = modules, device, offloaded
        self.trips = 0  # uses that brought the weights over: what tests and logs can see on a CPU too
        if offloaded:
            self._move(HOST)

    @property
    def where(self) -> str:
        return "in CPU memory between uses" if self.offloaded else f"on {self.device.type}"

    @contextmanager
    def use(self) -> Iterator[None]:
        """The modules on the device for the block; back in CPU memory after it, if offloaded."""
        if not self.offloaded:
            yield
            return
        self._move(self.device)
        self.trips += 1
        try:
            yield
        finally:
            self._move(HOST)

    def _move(self, device: torch.device) -> None:
        for module in self.modules:
            module.to(device)
        log.debug("%d module(s) moved to %s", len(self.modules), device)


def resident(device: torch.device) -> Residence:
    """Weights that stay on the device: `use` does nothing."""
    return Residence([], device, offloaded=False)
