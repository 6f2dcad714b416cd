"""What the safety checker costs per image, through the worker's own SafetyChecker code path.

    .venv/bin/python benchmarks/cost/safety.py [--machine "2-core CPU sandbox"] [--out FILE]

Two checkers, both real ViTForImageClassification folders loaded by `SafetyChecker.load`:
- tiny: the tests' 32x32, 1-layer checker (builder/tiny_model.py);
- ViT-B/16: the default checker's architecture (Falconsai/nsfw_image_detection: ViTConfig
  defaults, 224x224, 12 layers of width 768, 2 labels) with random weights. Its speed does
  not depend on the weights, so no download is needed.
Inputs are 1024x1024 images in [0, 1] on the worker's device, in batches of 1 and 4, as a
job hands them over; each figure is the median of several timed runs after warm-up and
includes the resize and normalisation. Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor  # noqa: E402

from benchmarks import results_file  # noqa: E402
from builder.tiny_model import build_tiny_safety_checker  # noqa: E402
from src.model.pipeline import pick_device  # noqa: E402
from src.model.safety import SafetyChecker  # noqa: E402

SIDE = 1024
BATCHES = (1, 4)


def build_vit_b16(path: Path) -> Path:
    """Falconsai/nsfw_image_detection's architecture and processor config, random weights."""
    config = ViTConfig(id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    ViTForImageClassification(config).save_pretrained(path, safe_serialization=True)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(path)
    return path


def time_batches(checker: SafetyChecker, device: torch.device, repeats: int) -> dict[int, float]:
    """Median milliseconds per batch for each batch size."""
    medians = {}
    for batch in BATCHES:
        images = torch.rand(batch, 3, SIDE, SIDE, device=device)
        for _ in range(2):  # warm-up: first calls pay for allocator and kernel selection
            checker.flags(images)
        runs = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            checker.flags(images)  # returns Python bools: the device has finished
            runs.append((time.perf_counter() - start) * 1000)
        medians[batch] = statistics.median(runs)
    return medians


def default_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {results_file.machine()}"
    return results_file.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--machine", help="how the results name the machine (default: detected)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per batch size (default 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "safety_cost.md")
    args = parser.parse_args()

    device, dtype = pick_device()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "tiny (tests)": build_tiny_safety_checker(Path(tmp) / "tiny"),
            "ViT-B/16 (default's architecture)": build_vit_b16(Path(tmp) / "vit-b16"),
        }
        for name, folder in folders.items():
            checker = SafetyChecker.load(folder, 0.5, device, dtype)
            params = sum(p.numel() for p in checker.model.parameters())
            for batch, ms in time_batches(checker, device, args.repeats).items():
                rows.append(f"| {name} | {params / 1e6:.2f} M | {batch} | {ms:.1f} | {ms / batch:.1f} |")

    facts = [
        f"device: {device}, {str(dtype).removeprefix('torch.')}",
        f"input: {SIDE}x{SIDE} images in [0, 1] on the device, resize + normalise + classify "
        f"(`SafetyChecker.flags`), median of {args.repeats} runs after 2 warm-up runs",
    ]
    host = args.machine or default_machine(device)
    table = [
        "| checker | parameters | batch | ms per batch | ms per image |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    print(
        results_file.write(
            args.out, results_file.header("Safety checker cost per image", facts, host=host) + table
        )
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
