"""Every GPU figure in one run of at most 8 minutes: `bash benchmarks/gpu.sh` calls this.

Each section runs in its own process with its own time box, so a CUDA hang, an
out-of-memory or a crash in one is a line in the results and the next section still runs.
Sections append their rows to `gpu-results.jsonl` as they measure them, and the Markdown
table is rewritten after each section, so a run killed at any point keeps what it measured.

Environment (all optional): OUT (results folder; else benchmarks/results/, or
benchmarks/results/tiny/ with GPU_BENCH_TINY=1), GPU_BENCH_WORK (model folder and images;
/tmp/zimage-gpu-bench), GPU_BENCH_RUNS (timed jobs per figure, after a warm-up; 5),
GPU_BENCH_SIZES (comma-separated), GPU_BENCH_BUDGET (seconds; 480), GPU_BENCH_BOXES
("name=seconds,..."), GPU_BENCH_T0 (when the command started, epoch seconds).
For tests: GPU_BENCH_FAIL=name makes that section raise, GPU_BENCH_HANG=name makes it hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.report import results_markdown  # noqa: E402

RESULTS, TABLE, LOG = "gpu-results.jsonl", "gpu-results.md", "gpu-log.txt"
SIZES = ("1024*1024", "512*512", "1280*720", "1280*1280")
# Seconds from the command's start, the wheel install included (about 10 s).
BUDGET_S = 480
# Most important first; each box is what the section needs on one H100/H200 with margin.
# A section may also use what earlier ones left unused, never what later ones are due
# (boxes add up to 470 s: 10 s stay for the wheel install before them).
BOXES = {
    "machine": 15,  # nvidia-smi, one matrix product, the import of every pinned package
    # Time a section leaves unused flows on to the next.
    "load": 105,  # build 10B random bf16 params, save ~20 GB (the least known cost), reload it
    "text_to_image": 60,  # 4 sizes x 6 worker jobs, and as many bare diffusers calls
    "attention": 35,  # each installed backend, guidance 0 and > 0, 3 jobs each
    "fp8": 25,  # load, quantize, 6 jobs
    "compile": 55,  # load, regional compile warmed over every preset size, 6 jobs
    # text-to-image for reference, image-to-image, num_images 4, the acceleration levels regular
    # and high on Turbo (4 jobs each), inpainting, outpainting (the picture widened to 16:9: 3 jobs
    # at 1808*1024, from 1024x1024), a LoRA, control (a random 3.36B ControlNet built
    # on the GPU, then 6 jobs), the base model (a second random 6.15B transformer built on the GPU,
    # then 3 jobs of 50 steps with guidance: 2 x 50 passes an image, about 12x a Turbo job, some
    # 25 s), and the base at acceleration high (2 jobs). attention, fp8 and compile gave it 30 s;
    # load and text_to_image 15 s for the acceleration rows.
    "modes": 80,
    # The memory plans (benchmarks/gpu/memory.py): 16 and 24 GB emulated, the worst jobs on each,
    # and every plan's 1024x1024 time; five worker starts from the saved model. 40 s is a guess
    # (never run on a GPU yet): load, compile and modes gave it 15, 15 and 20 s, upscaling took 10.
    "memory": 40,
    # Upscaling (benchmarks/gpu/upscaling.py): 1024 -> 2048 and -> 4096 without and with a random
    # Tile ControlNet: 9 and 25 tiles x 3 steps each, about 60 and 90 tile passes at 1024x1024 with
    # the ControlNet's half again, tiled VAE over 16 MP. 40 s is a guess (never run on a GPU yet):
    # load, text_to_image, attention, fp8, compile and modes gave it 5 s each, memory 10 s.
    "upscaling": 40,
    "job_loop": 15,  # benchmarks/loop/job_loop.py --quick, where it exists (it loads the model too)
}
MIN_BOX_S = 2


@dataclass(frozen=True)
class Config:
    out: Path
    work: Path
    tiny: bool
    runs: int
    sizes: tuple[str, ...]

    @property
    def model(self) -> Path:
        """Where the load section saves the model that every later section starts the worker on."""
        return self.work / ("tiny-zimage" if self.tiny else "zimage-full-size")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        tiny = env.get("GPU_BENCH_TINY", "") == "1"
        default_out = ROOT / "benchmarks" / "results" / ("tiny" if tiny else "")
        sizes = tuple(s.strip() for s in env.get("GPU_BENCH_SIZES", ",".join(SIZES)).split(",") if s.strip())
        return cls(
            out=Path(env.get("OUT") or default_out),
            work=Path(env.get("GPU_BENCH_WORK") or "/tmp/zimage-gpu-bench" + ("-tiny" if tiny else "")),
            tiny=tiny,
            runs=int(env.get("GPU_BENCH_RUNS", "5")),
            sizes=sizes,
        )


def emit(section: str, row: dict[str, Any], config: Config | None = None) -> None:
    """Append one measurement at once: a section killed later still leaves this line."""
    config = config or Config.from_env()
    with open(config.out / RESULTS, "a") as file:
        file.write(json.dumps({"section": section, **row}, default=str) + "\n")


def injected_fault(section: str) -> None:
    """The test hooks: make this section raise, or hang past its box."""
    if os.environ.get("GPU_BENCH_FAIL") == section:
        raise RuntimeError(f"made to fail by GPU_BENCH_FAIL={section}")
    if os.environ.get("GPU_BENCH_HANG") == section:
        time.sleep(10_000)


def boxes(env: dict[str, str]) -> dict[str, int]:
    overrides = dict(item.split("=", 1) for item in env.get("GPU_BENCH_BOXES", "").split(",") if "=" in item)
    unknown = set(overrides) - set(BOXES)
    if unknown:
        raise SystemExit(f"GPU_BENCH_BOXES: no section named {sorted(unknown)}; sections: {', '.join(BOXES)}")
    return {name: int(overrides.get(name, box)) for name, box in BOXES.items()}


def command(name: str) -> list[str]:
    # The two light sections import no model code, so they run even when that code does not import.
    script = {"machine": "machine.py", "job_loop": "job_loop.py"}.get(name, "sections.py")
    return [sys.executable, str(ROOT / "benchmarks" / "gpu" / script), name]


def run_section(name: str, timeout: float, log_path: Path) -> dict[str, Any]:
    """One section in its own process group, killed whole when its box runs out."""
    start = time.monotonic()
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "a") as log:
        log.write(f"\n===== {name} (box {timeout:.0f} s) =====\n")
        log.flush()
        process = subprocess.Popen(
            command(name), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its children too (the cold-start process)
            process.wait()
            rc = None
    status: dict[str, Any] = {"seconds": round(time.monotonic() - start, 1), "box_s": round(timeout)}
    if rc is None:
        return {"status": "timeout", **status, "error": f"ran past its {timeout:.0f} s box and was killed"}
    if rc != 0:
        with open(log_path) as log:
            log.seek(offset)
            lines = [line.strip() for line in log.read().splitlines() if line.strip()]
        return {"status": "error", **status, "error": (lines[-1] if lines else f"exit status {rc}")[:300]}
    return {"status": "ok", **status}


def main() -> None:
    env = dict(os.environ)
    config = Config.from_env(env)
    config.out.mkdir(parents=True, exist_ok=True)
    config.work.mkdir(parents=True, exist_ok=True)
    t0 = float(env.get("GPU_BENCH_T0") or time.time())
    deadline = t0 + float(env.get("GPU_BENCH_BUDGET", BUDGET_S)) - 3  # 3 s to write the last table
    box = boxes(env)
    for name in (RESULTS, TABLE, LOG):
        (config.out / name).unlink(missing_ok=True)
    emit(
        "run",
        {
            "started_utc": datetime.fromtimestamp(t0, UTC).strftime("%Y-%m-%d %H:%M"),
            "mode": "tiny" if config.tiny else "gpu",
            "budget_s": round(deadline + 3 - t0),
            "runs": config.runs,
            "sizes": " ".join(config.sizes),
            "boxes": " ".join(f"{n}={s}" for n, s in box.items()),
        },
        config,
    )
    names, begun = list(box), time.time()
    for i, name in enumerate(names):
        # Planned to end where the boxes so far add up to; never into what later sections are due.
        planned_end = begun + sum(box[earlier] for earlier in names[: i + 1])
        timeout = min(planned_end, deadline - sum(box[later] for later in names[i + 1 :])) - time.time()
        if timeout < MIN_BOX_S:
            status = {"status": "skipped", "error": f"no time left in the {BUDGET_S} s budget"}
        else:
            status = run_section(name, timeout, config.out / LOG)
        emit(name, status, config)
        (config.out / TABLE).write_text(results_markdown(config.out / RESULTS))
        print(f"{name}: {status['status']} {status.get('error', '')}", flush=True)
    print(f"done in {time.time() - t0:.0f} s; results in {config.out}")


if __name__ == "__main__":
    main()
