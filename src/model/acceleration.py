"""Acceleration levels (`acceleration`): diffusers' TaylorSeer step cache, set for one job at a time.

On a forecast step the transformer's blocks do not run: the output layer's result is forecast
from the last two computed steps (a first-order Taylor expansion in the step index; diffusers'
`TaylorSeerCacheConfig` in its "lite" form, where the blocks return nothing and only the output
layer's last values are kept, a few MB). The first steps are always computed (the forecast needs
a history, and they set the composition), then one step in `interval`, and the last steps (they set
the fine detail). `none` adds no hook at all: the pipeline as it is.

Why TaylorSeer: diffusers 0.42.1's other step caches (FirstBlockCache, MagCache, SeaCache) find
Z-Image's blocks but read each block's input by the name `hidden_states`, and Z-Image's block calls
it `x`, so all three fail on the first step; TaylorSeer hooks modules by name and needs no more.
(ZImageTransformer2DModel is not a CacheMixin in 0.42.1 either: hence apply_taylorseer_cache.)

Each job applies its level on the GPU thread, and the hooks are removed when its denoising ends,
so no state crosses jobs: a `none` job after a `high` one runs the plain modules again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, TaylorSeerCacheConfig, apply_taylorseer_cache
from diffusers.models.cache_utils import CacheMixin


@dataclass(frozen=True)
class StepSchedule:
    warm_up: int  # the first steps, always computed
    interval: int  # after them, one step in `interval` is computed and the others forecast
    cool_down: int  # the last steps, always computed


# Per model, per level (each of schema.ACCELERATION_LEVELS; tests/test_acceleration.py checks).
# Chosen by measurement on the tiny models (BENCHMARKS.md, "Acceleration levels"), starting from
# cache-dit's Z-Image settings (4 warm-up steps, at most 3 cached in a row): Turbo's 8 steps leave
# little to skip, so its warm-up is short and only the last step is kept; the base's 50 guided
# steps keep 4-5 of warm-up and 2 at the end.
LEVELS: dict[str, dict[str, StepSchedule | None]] = {
    "z-image-turbo": {"none": None, "regular": StepSchedule(3, 2, 1), "high": StepSchedule(2, 3, 1)},
    "z-image": {"none": None, "regular": StepSchedule(5, 2, 2), "high": StepSchedule(4, 3, 2)},
}

# Forecast: the output layer. Skipped on forecast steps: the main blocks, and the noise refiner
# unless a ControlNet calls it too (it shares the transformer's refiners: a hook there would count
# two calls a step, and the ControlNet does not run on every step). The ControlNet itself does not
# run on a forecast step (src/model/control_window.py): its hints go only into the skipped blocks.
FORECAST = r"^all_final_layer\.[^.]+$"
SKIPPED = r"^layers\.\d+$"
SKIPPED_WITHOUT_CONTROL = r"^noise_refiner\.\d+$"
# diffusers.hooks.taylorseer_cache._TAYLORSEER_CACHE_HOOK: the name its hooks are registered under.
HOOK = "taylorseer_cache"
# A compiled block would be traced through the hooks, whose per-step state changes its guards:
# recompiles in every job. So a compiled worker refuses the levels that add hooks.
COMPILED_NOTE = (
    "acceleration levels 'regular' and 'high' are refused on this worker: its transformer blocks are "
    "compiled, and the step-cache hooks would make them recompile in every job"
)


def refusal(level: str, compiled: bool) -> str | None:
    """Why this worker cannot run a level, as the job's error; None when it can."""
    if level == "none" or not compiled:
        return None
    return (
        f"acceleration: {level!r} is not available on this worker: it runs a compiled transformer "
        "(ZIMAGE_COMPILE=1), on which the step caches would recompile every job; send 'none' or leave "
        "'acceleration' out, or use a worker without ZIMAGE_COMPILE"
    )


def steps_run(num_inference_steps: int, strength: float | None) -> int:
    """How many steps the pipeline runs: all of them, or the last `strength` of them from an image
    (diffusers' get_timesteps in the Z-Image image-to-image and inpainting pipelines)."""
    if strength is None:
        return num_inference_steps
    start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
    return num_inference_steps - start


def computes(schedule: StepSchedule | None, steps: int, step: int) -> bool:
    """Whether step `step` of `steps` runs the transformer's blocks: TaylorSeer's rule on config_for's
    config (the warm-up, one step in `interval` after it, the cool-down); every step without a schedule."""
    if schedule is None:
        return True
    last = max(steps - schedule.cool_down, schedule.warm_up)
    return step < schedule.warm_up or (step - schedule.warm_up - 1) % schedule.interval == 0 or step >= last


def steps_computed(schedule: StepSchedule | None, steps: int) -> int:
    """How many of `steps` run the transformer's blocks (`computes`)."""
    return sum(computes(schedule, steps, step) for step in range(steps))


def config_for(schedule: StepSchedule, steps: int, patterns: list[str]) -> TaylorSeerCacheConfig:
    return TaylorSeerCacheConfig(
        cache_interval=schedule.interval,
        disable_cache_before_step=schedule.warm_up,
        disable_cache_after_step=max(steps - schedule.cool_down, schedule.warm_up),
        max_order=1,
        taylor_factors_dtype=torch.float32,  # the output layer's values only: small, and kept exact
        cache_identifiers=[FORECAST],
        skip_predict_identifiers=patterns,
    )


@contextmanager
def step_cache(
    schedule: StepSchedule | None,
    steps: int,
    transformer: torch.nn.Module,
    with_controlnet: bool = False,
) -> Iterator[None]:
    """The level's hooks on the transformer for one pipeline call, then none.

    A ControlNet gets no hooks here: on a forecast step its hints would only feed the skipped blocks,
    so it does not run at all then (src/model/control_window.py asks `computes` which steps it runs).
    """
    if schedule is None:
        yield
        return
    skipped = [SKIPPED] if with_controlnet else [SKIPPED, SKIPPED_WITHOUT_CONTROL]
    try:
        apply_taylorseer_cache(transformer, config_for(schedule, steps, skipped))
        # New hooks stale the registry's list of child registries, which the context reaches.
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        with CacheMixin.cache_context(transformer, "job"):
            yield
    finally:
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.remove_hook(HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
