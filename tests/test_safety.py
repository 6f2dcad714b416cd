"""The safety checker: real tiny ViT classifiers over the real pipeline, in-process and as a local API.

Three classifiers are built from ViTForImageClassification and saved with an image-processor
config, as a Hugging Face folder would hold them:
- fixed: P(nsfw) is the same for every image (never flags, always flags, or exactly 0.5);
- brightness: P(nsfw) = sigmoid(40 * (mean brightness - 0.5)), wired by hand
  (builder/tiny_model.py `_wire_brightness`), checked numerically below;
- cat/dog: a classifier without an `nsfw` label, which the worker must refuse at start.
A job is split by the brightness checker because the tiny model's images for seeds s, s+1,
s+2 differ slightly in brightness: the threshold is put between their scores, measured here
on the same tensors the worker checks.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from builder.tiny_model import build_tiny_safety_checker
from src.jobs import worker as worker_module
from src.jobs.worker import Worker
from src.model.safety import SafetyChecker, SafetyModelError
from src.request.schema import GenerateRequest
from src.runtime.settings import Settings
from src.runtime.timing import Stopwatch
from tests.conftest import ROOT, data_uri_of, decode_data_uri, handle_job, local_api, png_bytes, worker_env

CPU = torch.device("cpu")
SPLIT_JOB = {"prompt": "a red fox in snow", "size": "512*512", "num_inference_steps": 1, "seed": 21}


@pytest.fixture(scope="session")
def checkers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety-checkers")
    return {
        "always": build_tiny_safety_checker(root / "always", nsfw_bias=10.0),
        "half": build_tiny_safety_checker(root / "half", nsfw_bias=0.0),
        "brightness": build_tiny_safety_checker(
            root / "brightness", mode="brightness", pivot=0.5, slope=40.0
        ),
        "cat_dog": build_tiny_safety_checker(root / "cat-dog", labels=("cat", "dog")),
    }


def start(model: Path, checker: Path | str, threshold: float = 0.5) -> Worker:
    settings = Settings(model=str(model), safety_checker_model=str(checker), safety_threshold=threshold)
    return Worker.start(settings)


def job(worker: Worker, **fields) -> dict:
    return handle_job(worker, {"id": "safety-test", "input": {"prompt": "a red fox in snow", **fields}})


def solid(color: tuple[int, int, int]) -> str:
    return data_uri_of(png_bytes((64, 64), color))


@dataclass(frozen=True)
class Split:
    """SPLIT_JOB's three scores, measured on the very tensors the worker checks."""

    scores: list[float]

    def threshold(self, flagged: int) -> float:
        """A threshold halfway between scores, so that the `flagged` brightest images are flagged."""
        ordered = sorted(self.scores, reverse=True)
        return (ordered[flagged - 1] + ordered[flagged]) / 2

    def flags(self, flagged: int) -> list[bool]:
        return [score >= self.threshold(flagged) for score in self.scores]


@pytest.fixture(scope="session")
def split(tiny_model: Path, checkers: dict[str, Path]) -> Split:
    worker = start(tiny_model, checkers["brightness"])
    request = GenerateRequest(**SPLIT_JOB, num_images=3)
    images = worker.generator.generate(request, SPLIT_JOB["seed"], Stopwatch(CPU))
    scores = worker.safety.nsfw_probabilities(images)
    # The lever is small (seeds change the tiny model's brightness by ~1e-4), but far above
    # float32 noise (~1e-7); say so loudly if a change to the tiny model ever erases it.
    ordered = sorted(scores)
    assert min(b - a for a, b in zip(ordered, ordered[1:], strict=False)) > 1e-5, scores
    return Split(scores)


# ------------------------------------------------------------------ the classifiers themselves
def test_brightness_checker_scores_rise_with_brightness(checkers):
    checker = SafetyChecker.load(checkers["brightness"], 0.5, CPU, torch.float32)
    levels = torch.linspace(0.0, 1.0, 11)
    images = levels.view(-1, 1, 1, 1).expand(-1, 3, 96, 128).contiguous()
    scores = checker.nsfw_probabilities(images)
    assert all(a < b for a, b in zip(scores[2:9], scores[3:10], strict=False)), scores
    for level, score in zip(levels.tolist(), scores, strict=True):
        assert score == pytest.approx(1 / (1 + math.exp(-40 * (level - 0.5))), abs=1e-4)
    flags = checker.flags(images)
    assert flags[:5] == [False] * 5 and flags[6:] == [True] * 5  # 0.5 itself sits on the edge


def test_one_batch_scores_each_image_as_it_would_alone(checkers):
    checker = SafetyChecker.load(checkers["brightness"], 0.5, CPU, torch.float32)
    images = torch.rand(4, 3, 256, 192) * torch.tensor([0.6, 0.9, 1.0, 1.1]).view(-1, 1, 1, 1)
    together = checker.nsfw_probabilities(images.clamp(0, 1))
    alone = [checker.nsfw_probabilities(image[None].clamp(0, 1))[0] for image in images]
    assert together == pytest.approx(alone, abs=1e-6)
    assert len(set(together)) == 4


def test_fixed_checker_gives_exactly_one_half(checkers):
    scores = SafetyChecker.load(checkers["half"], 0.5, CPU, torch.float32).nsfw_probabilities(
        torch.rand(3, 3, 64, 64)
    )
    assert scores == [0.5, 0.5, 0.5]


def test_no_nsfw_label_is_refused_at_load_and_at_start(tiny_model, checkers):
    with pytest.raises(SafetyModelError, match=r"SAFETY_CHECKER_MODEL.*no 'nsfw' label.*cat, dog"):
        SafetyChecker.load(checkers["cat_dog"], 0.5, CPU, torch.float32)
    with pytest.raises(SafetyModelError, match="SAFETY_CHECKER_MODEL"):
        start(tiny_model, checkers["cat_dog"])


def test_a_folder_that_is_no_image_classifier_is_refused(checkers, tmp_path):
    folder = shutil.copytree(checkers["always"], tmp_path / "text-model")
    config = {"model_type": "qwen3", "id2label": {"0": "normal", "1": "nsfw"}, "label2id": {}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SafetyModelError, match="SAFETY_CHECKER_MODEL.*does not load as"):
        SafetyChecker.load(folder, 0.5, CPU, torch.float32)


def test_worker_process_without_nsfw_label_exits_naming_the_setting(tiny_model, checkers):
    env = worker_env(tiny_model, SAFETY_CHECKER_MODEL=str(checkers["cat_dog"]))
    result = subprocess.run(
        [sys.executable, "handler.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    logs = result.stdout + result.stderr
    assert result.returncode != 0, logs
    assert "SAFETY_CHECKER_MODEL" in logs and "no 'nsfw' label" in logs and "cat, dog" in logs
    assert "Traceback" not in logs


# --------------------------------------------------------------- the worker over the real pipeline
def test_threshold_edge_flags_at_the_threshold_not_just_below(tiny_model, checkers):
    at = job(start(tiny_model, checkers["half"], threshold=0.5), size="512*512", num_inference_steps=1)
    assert "error" in at and "flagged" in at["error"]
    below = job(
        start(tiny_model, checkers["half"], threshold=0.5000001), size="512*512", num_inference_steps=1
    )
    assert "error" not in below, below
    assert below["has_nsfw_concepts"] == [False] and below["cost"] == 0.005


@pytest.mark.parametrize("flagged", [1, 2])
def test_split_job_drops_flagged_images_before_encoding(tiny_model, checkers, split, flagged, monkeypatch):
    worker = start(tiny_model, checkers["brightness"], split.threshold(flagged))
    unchecked = job(worker, **SPLIT_JOB, num_images=3, enable_safety_checker=False)
    assert unchecked["has_nsfw_concepts"] == [False] * 3 and unchecked["cost"] == 0.015

    events: list[str] = []
    real_scores, real_encode = worker.safety.nsfw_probabilities, worker_module.encode_image

    def scores(images: torch.Tensor) -> list[float]:
        events.append(f"check {tuple(images.shape)}")
        return real_scores(images)

    def encode(*args, **kwargs) -> bytes:
        events.append("encode")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(worker.safety, "nsfw_probabilities", scores)
    monkeypatch.setattr(worker_module, "encode_image", encode)
    output = job(worker, **SPLIT_JOB, num_images=3)
    assert "error" not in output, output

    flags = split.flags(flagged)
    kept = [i for i, flag in enumerate(flags) if not flag]
    assert output["has_nsfw_concepts"] == flags and sum(flags) == flagged
    # One batch, checked before anything is encoded; only the kept images are ever encoded.
    assert events == ["check (3, 3, 512, 512)"] + ["encode"] * len(kept)
    assert output["cost"] == 0.005 * len(kept)
    seed = SPLIT_JOB["seed"]
    assert [entry["seed"] for entry in output["images"]] == [seed + i for i in kept]
    assert output["seed"] == seed + kept[0] and output["image_url"] == output["images"][0]["image_url"]
    # The kept images are the very images an unchecked run returns at those positions.
    assert [entry["image_url"] for entry in output["images"]] == [
        unchecked["images"][i]["image_url"] for i in kept
    ]
    assert output["timings"]["safety"] > 0


def test_all_flagged_fails_the_job_and_encodes_nothing(tiny_model, checkers, monkeypatch):
    worker = start(tiny_model, checkers["always"])
    encoded: list[int] = []
    monkeypatch.setattr(worker_module, "encode_image", lambda *a, **k: encoded.append(1) or b"")
    output = job(worker, size="512*512", num_inference_steps=1, num_images=2)
    assert set(output) == {"error"}
    assert (
        "all 2 generated image(s) were flagged" in output["error"]
        and "nothing was returned or charged" in (output["error"])
    )
    assert encoded == []
    monkeypatch.undo()
    # The worker keeps serving, and one request may turn the check off.
    assert "error" not in job(worker, size="512*512", num_inference_steps=1, enable_safety_checker=False)


def test_checking_off_per_request(tiny_model, checkers):
    worker = start(tiny_model, checkers["always"])
    output = job(worker, size="512*512", num_inference_steps=1, num_images=2, enable_safety_checker=False)
    assert "error" not in output, output
    assert output["has_nsfw_concepts"] == [False, False] and output["cost"] == 0.01
    assert output["timings"]["safety"] == 0
    assert len(output["images"]) == 2


def test_checking_off_per_request_for_untouched_input_reports_no_safety_time(tiny_model, checkers):
    worker = start(tiny_model, checkers["always"])
    source = data_uri_of(png_bytes((1024, 1024), (90, 90, 90)))
    output = job(
        worker, image=source, strength=0.0, size="1024*1024", num_images=4, enable_safety_checker=False
    )
    assert output["has_nsfw_concepts"] == [False] * 4
    assert output["timings"]["safety"] == 0


def test_checking_off_per_deployment(tiny_model, caplog):
    assert not Settings.from_env({"SAFETY_CHECKER_MODEL": "NONE"}).safety_enabled
    with caplog.at_level("WARNING", logger="src.jobs.worker"):
        worker = Worker.start(Settings(model=str(tiny_model), safety_checker_model="none"))
    assert worker.safety is None
    assert "without any content check" in caplog.text
    output = job(worker, size="512*512", num_inference_steps=1, num_images=2)
    assert output["has_nsfw_concepts"] == [False, False] and output["timings"]["safety"] == 0


def test_image_to_image_input_is_checked_too(tiny_model, checkers, split):
    """Strength 0 returns the fitted input untouched by the model: the checker still sees it."""
    worker = start(tiny_model, checkers["brightness"], split.threshold(1))
    white = job(worker, image=solid((255, 255, 255)), strength=0.0, size="512*512")
    assert "error" in white and "all 1 generated image(s) were flagged" in white["error"]
    black = job(worker, image=solid((0, 0, 0)), strength=0.0, size="512*512")
    assert "error" not in black and black["has_nsfw_concepts"] == [False]
    assert decode_data_uri(black["image_url"]).getpixel((10, 10)) == (0, 0, 0)


def test_inpainting_is_checked_after_the_composite(tiny_model, checkers):
    """The checker sees what is returned: a white picture with a small hole is still bright."""
    worker = start(tiny_model, checkers["brightness"], 0.5)
    hole = Image.new("L", (64, 64), 0)
    hole.paste(255, (24, 24, 40, 40))
    buffer = io.BytesIO()
    hole.save(buffer, format="PNG")
    mask = data_uri_of(buffer.getvalue())
    fields = {"mask": mask, "size": "256*256", "strength": 1.0, "num_inference_steps": 1, "seed": 2}
    white = job(worker, image=solid((255, 255, 255)), **fields)
    assert "error" in white and "all 1 generated image(s) were flagged" in white["error"]
    black = job(worker, image=solid((0, 0, 0)), **fields)
    assert "error" not in black and black["has_nsfw_concepts"] == [False]
    assert decode_data_uri(black["image_url"]).getpixel((10, 10)) == (0, 0, 0)


# ------------------------------------------------------------------------------ the local API
def test_local_api_with_a_real_checker(tiny_model, checkers, split, tmp_path):
    env = worker_env(
        tiny_model,
        SAFETY_CHECKER_MODEL=str(checkers["brightness"]),
        SAFETY_THRESHOLD=repr(split.threshold(1)),
    )
    with local_api(env, tmp_path / "api.log") as api:
        reply = api.runsync({**SPLIT_JOB, "num_images": 3})
        assert reply["status"] == "COMPLETED", reply
        output = reply["output"]
        flags = split.flags(1)
        kept = [i for i, flag in enumerate(flags) if not flag]
        assert output["has_nsfw_concepts"] == flags
        assert [entry["seed"] for entry in output["images"]] == [SPLIT_JOB["seed"] + i for i in kept]
        assert output["cost"] == 0.005 * len(kept)

        white = {"prompt": "a", "image": solid((255, 255, 255)), "strength": 0.0, "size": "512*512"}
        failed = api.runsync({**white, "num_images": 2})
        assert failed["status"] == "FAILED" and "all 2 generated image(s) were flagged" in failed["error"]
        unchecked = api.runsync({**white, "enable_safety_checker": False})
        assert unchecked["status"] == "COMPLETED", unchecked
        assert unchecked["output"]["has_nsfw_concepts"] == [False]
        logs = api.log()
    assert "safety checker: ViTForImageClassification" in logs
