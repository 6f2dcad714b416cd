"""The benchmarks run: the GPU benchmark's full-size model has Z-Image Turbo's real sizes (built
on the meta device), and the cost benchmarks measure and write their tables. The deployed-loop
benchmark runs as the GPU benchmark's last section (tests/test_gpu_bench.py checks its rows)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.full_size import full_size_pipeline
from tests.conftest import ROOT


def test_full_size_architecture_matches_the_published_model():
    pipe = full_size_pipeline("meta")
    count = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "text_encoder", "vae")
    }
    assert 6.1e9 < count["transformer"] < 6.2e9  # "about 6.15B transformer parameters"
    assert 3.9e9 < count["text_encoder"] < 4.1e9  # Qwen3-4B without its LM head
    assert 8.0e7 < count["vae"] < 9.0e7  # the FLUX VAE
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert pipe.vae_scale_factor == 8 and pipe.transformer.in_channels == 16


def test_the_acceleration_benchmark_runs_and_writes_a_row_per_model_and_level(tmp_path):
    from src.model.acceleration import LEVELS

    out = tmp_path / "acceleration.md"
    command = ["benchmarks/cost/acceleration.py", "--size", "512*512", "--runs", "1", "--turbo-steps", "4"]
    done = subprocess.run(
        [sys.executable, *command, "--base-steps", "4", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| z-image")]
    assert [(row[0].removeprefix("| "), row[2]) for row in rows] == [
        (model, level) for model, levels in LEVELS.items() for level in levels
    ]
    # `none` is the reference: its own image, and its own time.
    for row in rows:
        if row[2] == "none":
            assert row[6:8] == ["1.0", "-"] and row[-1] == "identical |", row


def test_the_imports_benchmark_runs_and_writes_its_three_rows(tmp_path):
    out = tmp_path / "imports.md"
    done = subprocess.run(
        [sys.executable, "benchmarks/cost/imports.py", "--runs", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.count("|") == 4}
    assert {
        "floor: torch, ZImagePipeline, Qwen3Model",
        "handler",
        "floor, the GC paused as in handler.py",
    } <= set(rows)
    ratios = [
        float(line.split(": ")[1].split()[0])
        for line in text.splitlines()
        if line.startswith("- handler / floor")
    ]
    assert len(ratios) == 2 and all(0.3 < ratio < 3 for ratio in ratios)
    assert "paramiko" not in text and "fastapi" not in text  # neither is imported on the way any more


def test_the_expansion_benchmark_writes_a_results_file(tmp_path):
    out = tmp_path / "expansion.md"
    command = ["benchmarks/cost/expansion.py", "--tokens", "8", "--prompt-tokens", "16", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, *command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("# Prompt expansion") and "- machine: " in text and "- command: `python " in text
    row = next(line for line in text.splitlines() if line.startswith("| eager"))
    prefill, per_token, per_second, rewrite = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
    assert 0 < prefill and 0 < per_token < rewrite
    assert per_second == pytest.approx(1000 / per_token, rel=0.01)  # ms per token is shown rounded
