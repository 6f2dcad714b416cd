"""Both models on one worker: each model's stages with its own defaults, on the tiny models (CPU).

    python benchmarks/cost/two_models.py --runs 3 --out benchmarks/results/two_models.md

Turbo (8 steps, no guidance) and a base-shaped tiny model (Turbo's text encoder, tokenizer and
VAE files, a transformer of other weights; 50 steps, guidance 4.0 with a negative prompt), both
loaded by one `Worker.start`, at 1024*1024. Medians of `--runs` jobs after one warm-up job each,
from the jobs' own `timings`. On a GPU the full-size figures come from `benchmarks/gpu.sh`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import results_file  # noqa: E402
from builder.tiny_model import build_tiny_base, build_tiny_zimage  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

STAGES = ("encode_prompt", "denoise", "decode", "encode_image", "total")
JOBS = {
    "z-image-turbo": {},
    "z-image": {"negative_prompt": "blurry, low quality"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", default="1024*1024")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/two_models.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zimage-two-") as tmp:
        turbo = build_tiny_zimage(Path(tmp) / "turbo")
        base = build_tiny_base(turbo, Path(tmp) / "base")
        worker = Worker.start(Settings(model=str(turbo), base_model=str(base), safety_checker_model="none"))
        rows = []
        for model, extra in JOBS.items():
            job = {"prompt": "a harbour at dawn", "size": args.size, "model": model, **extra}
            samples = []
            for i in range(args.runs + 1):  # the first is the warm-up
                output = asyncio.run(
                    worker.run(f"{model}-{i}", {**job, "prompt": f"{job['prompt']} {i}", "seed": i})
                )
                samples.append(output["timings"])
            row = {"model": model, "cost": output["cost"]}
            row.update(
                {stage: round(statistics.median(s[stage] for s in samples[1:]), 1) for stage in STAGES}
            )
            rows.append(row)
            print(row, flush=True)
    facts = [
        f"{args.size}, each model's defaults (Turbo 8 steps, guidance 0; base 50 steps, guidance 4.0 "
        f"and a negative prompt), PNG, data URI; medians of {args.runs} jobs after a warm-up, ms"
    ]
    header = results_file.header("Both models on one worker (tiny models)", facts)
    results_file.write(args.out, header + results_file.table(rows))
    print("\n".join(results_file.table(rows)))


if __name__ == "__main__":
    main()
