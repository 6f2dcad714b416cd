"""The cold start's imports: `import handler` against the floor that any Z-Image worker pays.

    python benchmarks/cost/imports.py [--runs 5] [--out benchmarks/results/imports.md]

The floor is torch, diffusers' `ZImagePipeline` and transformers' `Qwen3Model`: what loading
the model needs at all. Each round imports the floor and the handler in fresh processes, one
after the other, so both see the same machine; the table gives their medians and the ratio
(the target: at most 1.10). handler.py pauses Python's cyclic GC while it imports, which a stock
worker does not, so a third row imports the floor the same way: against it, the ratio is what
the handler's own imports add. A second table, from the first round's `-X importtime` (every
import runs with it), lists the largest imports the handler adds on top of the floor: what a
leaner start would cut next.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import results_file  # noqa: E402

FLOOR = "import torch; from diffusers import ZImagePipeline; from transformers import Qwen3Model"
HANDLER = "import handler"
FLOOR_GC_PAUSED = f"import gc; gc.disable(); {FLOOR}"
TARGET = 1.10


def measured(statement: str) -> tuple[float, dict[str, int]]:
    """Wall time of `statement` in a fresh interpreter, from its first line to its last, and each
    module's own import time (microseconds) from the same run's `-X importtime`. (Its per-import
    line costs every row alike; one process gives both, so a round is three imports, not five.)"""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    times = {}
    for line in done.stderr.splitlines():
        if match := re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(.+)$", line):
            times[match[2].strip()] = int(match[1])
    return float(done.stdout.strip().splitlines()[-1]), times


def extra_imports(floor: dict[str, int], handler: dict[str, int], top: int = 12) -> list[dict]:
    """The handler's largest own-time imports that the floor does not import, grouped by package."""
    by_package: dict[str, int] = {}
    for module, micros in handler.items():
        if module not in floor:
            # diffusers by subpackage: its pipelines and model families are imported lazily, one by one.
            depth = 3 if module.startswith("diffusers") else 1
            package = ".".join(module.split(".")[:depth])
            by_package[package] = by_package.get(package, 0) + micros
    ranked = sorted(by_package.items(), key=lambda item: -item[1])[:top]
    return [{"package": name, "own import time (ms)": round(micros / 1000)} for name, micros in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "imports.md")
    args = parser.parse_args()
    load = results_file.load_average()
    floor, handler, floor_gc_paused = [], [], []
    own_times: dict[str, dict[str, int]] = {}  # the first round's, per statement
    for _ in range(args.runs):
        for runs, statement in ((floor, FLOOR), (handler, HANDLER), (floor_gc_paused, FLOOR_GC_PAUSED)):
            seconds, times = measured(statement)
            runs.append(seconds)
            own_times.setdefault(statement, times)
    ratio = statistics.median(handler) / statistics.median(floor)
    own = statistics.median(handler) / statistics.median(floor_gc_paused)
    rows = [
        {
            "import": name,
            "median (s)": f"{statistics.median(runs):.2f}",
            "runs (s)": ", ".join(f"{s:.2f}" for s in runs),
        }
        for name, runs in (
            ("floor: torch, ZImagePipeline, Qwen3Model", floor),
            ("handler", handler),
            ("floor, the GC paused as in handler.py", floor_gc_paused),
        )
    ]
    facts = [
        f"handler / floor: {ratio:.2f} (target at most {TARGET:.2f})",
        f"handler / floor with the GC paused alike: {own:.2f} (what the handler's own imports add)",
        f"{args.runs} rounds, each importing the three in fresh processes, one after the other",
    ]
    lines = results_file.header("Cold start: import handler against the floor", facts, load_at_start=load)
    lines += results_file.table(rows) + ["", "What the handler imports beyond the floor:", ""]
    lines += results_file.table(extra_imports(own_times[FLOOR], own_times[HANDLER]))
    print(results_file.write(args.out, lines))


if __name__ == "__main__":
    main()
