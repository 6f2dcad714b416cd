"""The control window (`control_start`, `control_end`) on the real control pipelines, both models.

The ControlNet's runs are counted where they happen (a pre-hook inside its first control block,
tests/test_acceleration.py's `counting`), so a job's count is the steps on which it really ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from src.jobs.worker import Worker
from src.model.acceleration import LEVELS, StepSchedule, steps_computed
from src.model.control_window import controlled_steps
from src.request.models import MODELS
from tests.conftest import handle_job
from tests.test_acceleration import counting, folders, no_hooks_left, pixels, start  # noqa: F401
from tests.test_control import CONTROL, IMAGE, MASK, png_uri, shapes
from tests.test_two_models import base_model  # noqa: F401

JOB = {
    "prompt": "a house",
    "size": "256*256",
    "seed": 5,
    "num_inference_steps": 4,
    "control_image": CONTROL,
}
MODES = {"text-to-image with control": {}, "inpainting with control": {"image": IMAGE, "mask": MASK}}


@pytest.fixture(scope="module")
def served(tiny_model: Path, base_model: Path, folders: dict[str, Path]) -> Worker:  # noqa: F811
    """Turbo and the base-shaped model, a 2.1 ControlNet (it inpaints too)."""
    return start(tiny_model, base_model, folders)


def run(worker: Worker, **fields) -> dict:
    output = handle_job(worker, {"id": "window", "input": {**JOB, **fields}})
    assert "error" not in output, output
    return output


def failure(worker: Worker, **fields) -> str:
    output = handle_job(worker, {"id": "bad-window", "input": {**JOB, **fields}})
    assert set(output) == {"error"}, output
    return output["error"]


# ------------------------------------------------------------------------ the rule
def test_which_steps_are_controlled():
    assert controlled_steps(8, 0.0, 1.0) == [True] * 8
    assert controlled_steps(8, 0.25, 0.75) == [False, False, True, True, True, True, False, False]
    assert controlled_steps(8, 0.0, 0.5) == [True] * 4 + [False] * 4
    assert controlled_steps(8, 0.5, 1.0) == [False] * 4 + [True] * 4
    assert controlled_steps(3, 0.0, 0.34) == [True, True, False]  # 1/3 < 0.34
    assert controlled_steps(3, 0.0, 1 / 3) == [True, False, False]  # i/n = end is outside
    assert controlled_steps(1, 0.0, 0.01) == [True] and controlled_steps(1, 0.5, 1.0) == [False]
    # With a level, the forecast steps are skipped too: the warm-up 0-1, then 3, 6 and the last, 7.
    high = StepSchedule(2, 3, 1)
    assert controlled_steps(8, 0.0, 1.0, high) == [True, True, False, True, False, False, True, True]
    assert controlled_steps(8, 0.25, 0.75, high) == [False, False, False, True, False, False, False, False]


# ------------------------------------------------------------- the jobs: bytes and counts
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", list(MODES))
def test_the_full_window_is_exactly_todays_bytes(served, model, mode):
    fields = {**MODES[mode], "model": model, "num_inference_steps": 3}
    plain = run(served, **fields)["image_url"]
    assert run(served, **fields, control_start=0.0, control_end=1.0)["image_url"] == plain
    windowed = run(served, **fields, control_start=0.34)
    assert windowed["image_url"] != plain  # and the window changes the picture
    assert no_hooks_left(served)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("level", ["none", "high"])
def test_the_controlnet_runs_only_inside_the_window(served, model, mode, level):
    # 6 steps: the window [0.25, 0.75) holds steps 2, 3 and 4; Turbo's `high` computes 0, 1, 3 and 5.
    fields = {**MODES[mode], "model": model, "acceleration": level, "num_inference_steps": 6}
    schedule = LEVELS[model][level]
    with counting(served, model) as counts:
        run(served, **fields, control_start=0.25, control_end=0.75)
    assert counts["controlnet"] == sum(controlled_steps(6, 0.25, 0.75, schedule)), counts
    assert counts["transformer"] == steps_computed(schedule, 6), counts
    assert no_hooks_left(served)


def test_outside_the_window_is_exactly_a_hint_of_scale_0(served):
    """Skipping the ControlNet equals running it with its hints multiplied by 0 on those steps."""
    skipped = run(served, control_start=0.5, num_inference_steps=4)
    controlnet = served.generator.pipelines["text-to-image with control"].controlnet
    calls = []

    def zero_early_hints(module, args, kwargs, hints):
        calls.append(1)
        return {k: v * 0 for k, v in hints.items()} if len(calls) <= 2 else hints

    handle = controlnet.register_forward_hook(zero_early_hints, with_kwargs=True)
    try:
        scaled = run(served, num_inference_steps=4)
    finally:
        handle.remove()
    assert len(calls) == 4
    assert np.array_equal(pixels(skipped), pixels(scaled))


def test_auto_size_from_the_control_image(served):
    control = png_uri(shapes(320, 256))
    output = run(served, control_image=control, size="auto", num_inference_steps=1)
    assert (output["width"], output["height"]) == (320, 256)
    assert output["timings"]["preprocess_control"] > 0


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"control_start": 0.5, "control_end": 0.5}, "control_end: 0.5 is not allowed: it must be greater"),
        ({"control_start": 0.8, "control_end": 0.2}, "control_end: 0.2 is not allowed"),
        ({"control_end": 0.0}, "control_end: 0.0 is not allowed: it must be greater than control_start"),
        ({"control_start": 1.0}, "control_end: 1.0 is not allowed"),
        ({"control_start": -0.1}, "control_start: -0.1 (a number) is not allowed: it must be a number"),
        ({"control_end": 1.5}, "control_end: 1.5 (a number) is not allowed"),
        ({"control_start": "0.2"}, "control_start: '0.2' is not allowed"),
        ({"control_end": True}, "control_end: true (a boolean) is not allowed"),
        ({"control_image": None, "control_start": 0.2}, "control_start: only applies with 'control_image'"),
        ({"control_image": None, "control_end": 0.8}, "control_end: only applies with 'control_image'"),
    ],
)
def test_refusals_name_the_field(served, fields, says):
    message = failure(served, **{k: v for k, v in fields.items()})
    assert message.startswith(says), message
