"""What control costs on top of plain text-to-image, through the worker's own job path.

    python benchmarks/cost/control.py [--runs 5] [--size 1024*1024]

On the tiny model with a tiny 2.1-style ControlNet and a tiny Depth Anything (tests/
tiny_controlnets.py): the same job plain, with a ready control map (`none`), with `canny`
and with `depth`, and the control map with a control window (`control_end` 0.5 and 0.25: the
ControlNet runs on the first half, the first quarter of the steps). Prints a Markdown table of
medians (ms) of `total`, `preprocess_control` and `denoise`; the ControlNet's real size is in
BENCHMARKS.md (meta-device count).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.run import photo_like  # noqa: E402
from builder.tiny_model import build_tiny_zimage  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402
from tests.tiny_controlnets import build_tiny_depth, save_controlnet  # noqa: E402

STAGES = ("total", "preprocess_control", "denoise")


def picture_uri(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    photo_like().resize(size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="1024*1024")
    args = parser.parse_args()
    width, height = (int(side) for side in args.size.split("*"))
    with tempfile.TemporaryDirectory(prefix="zimage-control-") as tmp:
        model = build_tiny_zimage(Path(tmp) / "tiny-zimage")
        folder, _ = save_controlnet(model, "2.1", Path(tmp) / "controlnet")
        depth = build_tiny_depth(Path(tmp) / "depth")
        worker = Worker.start(
            Settings(
                model=str(model),
                safety_checker_model="none",
                controlnet_model=str(folder),
                depth_model=str(depth),
            )
        )
        control = picture_uri((width, height))
        variants = {
            "plain": {},
            "control map (none)": {"control_image": control},
            "canny": {"control_image": control, "control_preprocess": "canny"},
            "depth": {"control_image": control, "control_preprocess": "depth"},
            "window 0.0-0.5": {"control_image": control, "control_end": 0.5},
            "window 0.0-0.25": {"control_image": control, "control_end": 0.25},
        }
        rows = []
        for name, fields in variants.items():
            job = {"prompt": "a harbour at dawn", "size": args.size, **fields}
            asyncio.run(worker.run("warm", {**job, "seed": 0}))
            samples = [
                asyncio.run(worker.run(f"{name}-{i}", {**job, "seed": i}))["timings"]
                for i in range(args.runs)
            ]
            rows.append([name] + [f"{statistics.median(s[k] for s in samples):.1f}" for k in STAGES])
    print("| job | " + " | ".join(STAGES) + " |")
    print("| --- |" + " ---: |" * len(STAGES))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
