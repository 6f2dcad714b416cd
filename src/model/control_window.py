"""The control window (`control_start`, `control_end`): the steps on which the ControlNet runs.

Step i of n (from 0, n the steps the pipeline runs) is controlled when control_start <= i/n <
control_end. Outside the window the ControlNet's forward does not run at all, which saves its
compute (2.1: about half the transformer's), and the transformer gets no control hints: diffusers'
Z-Image transformer adds each hint to its stream (`unified + hint`), so no hint is exactly a hint
of scale 0, and the step is the plain model's step on the same latents.

With an acceleration level (src/model/acceleration.py) the ControlNet also skips the steps whose
transformer blocks are forecast: its hints would go only into blocks that do not run.

The window is a diffusers hook on the ControlNet for one pipeline call, on the GPU thread, removed
when denoising ends; a full window on a plain level adds no hook: the pipeline exactly as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from src.model.acceleration import StepSchedule, computes

HOOK = "control_window"


def in_window(step: int, steps: int, start: float, end: float) -> bool:
    return start <= step / steps < end


def controlled_steps(
    steps: int, start: float, end: float, schedule: StepSchedule | None = None
) -> list[bool]:
    """For each of `steps`: whether the ControlNet runs (inside the window, and not forecast)."""
    return [in_window(i, steps, start, end) and computes(schedule, steps, i) for i in range(steps)]


class ControlWindow(ModelHook):
    """The ControlNet's forward on the steps marked in `runs`; no hints (an empty dict) on the others."""

    def __init__(self, runs: list[bool]) -> None:
        super().__init__()
        self.runs = runs
        # The step of each timestep seen: a step is counted by its timestep, not by calls, because
        # upscaling calls the ControlNet once per tile in every step (src/model/upscale.py).
        self.steps: dict[float, int] = {}

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        timestep = kwargs["t"] if "t" in kwargs else args[1]
        step = self.steps.setdefault(float(timestep.flatten()[0]), len(self.steps))
        if step < len(self.runs) and self.runs[step]:
            return self.fn_ref.original_forward(*args, **kwargs)
        return {}


@contextmanager
def control_window(controlnet: torch.nn.Module | None, runs: list[bool]) -> Iterator[None]:
    """The window on `controlnet` for one pipeline call; nothing when it runs on every step."""
    if controlnet is None or all(runs):
        yield
        return
    registry = HookRegistry.check_if_exists_or_initialize(controlnet)
    registry.register_hook(ControlWindow(runs), HOOK)
    try:
        yield
    finally:
        registry.remove_hook(HOOK, recurse=False)
