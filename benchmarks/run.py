"""One command for the worker's speed: stages, every preset size, cold start, memory, options.

    python benchmarks/run.py                 # CPU: the tiny model; GPU: the full-size architecture
    python benchmarks/run.py --runs 5 --out BENCHMARKS.md

On a GPU it builds Z-Image Turbo's real architecture (6.15B-parameter transformer, Qwen3-4B
text encoder, FLUX VAE) from the real configs with random bf16 weights and saves it to disk:
speed does not depend on the weights' values, so its timings are the real model's. On a
CPU it uses the tiny model of builder/tiny_model.py. Figures are medians of `--runs` jobs
after one warm-up job, measured inside the handler (the `timings` a caller sees).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.full_size import build_full_size  # noqa: E402
from benchmarks.gpu.report import END, START, replace_section  # noqa: E402
from src.delivery.encoding import encode_image, fast_png  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.model.pipeline import ZImageGenerator, pick_device  # noqa: E402
from src.request.schema import PRESET_SIZES  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

STAGES = ("encode_prompt", "denoise", "decode", "safety", "encode_image", "upload", "total")
PROMPT = "A cozy reading nook by a rain-streaked window, warm lamp light, a cat asleep on a stack of books"


def run_job(worker: Worker, job_id: str, job_input: dict) -> dict:
    return asyncio.run(worker.run(job_id, job_input))


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def stage_table(worker: Worker, sizes: tuple[str, ...], runs: int, fmt: str = "png") -> list[dict]:
    rows = []
    for size in sizes:
        job = {"prompt": PROMPT, "size": size, "seed": 1, "output_format": fmt}
        run_job(worker, "warm", job)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        # A new prompt each run: the embedding cache would otherwise hide the text encoder.
        samples = [
            run_job(worker, f"bench-{i}", {**job, "prompt": f"{PROMPT}, {size}, take {i}", "seed": i})[
                "timings"
            ]
            for i in range(runs)
        ]
        row = {"size": size, **{stage: median([s[stage] for s in samples]) for stage in STAGES}}
        diffusers_ms = [s["encode_prompt"] + s["denoise"] + s["decode"] for s in samples]
        overhead = [s["total"] - d for s, d in zip(samples, diffusers_ms, strict=True)]
        row["overhead_pct"] = round(100 * statistics.median(overhead) / statistics.median(diffusers_ms), 1)
        # The same without image encoding: validation, tensor-to-PIL, data URI, response.
        own = [o - s["encode_image"] for o, s in zip(overhead, samples, strict=True)]
        row["overhead_excl_encoding_pct"] = round(
            100 * statistics.median(own) / statistics.median(diffusers_ms), 1
        )
        if torch.cuda.is_available():
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def prompt_padding(generator: ZImageGenerator, runs: int) -> dict:
    """Encoding time: diffusers' 512-token padding against padding to the prompt's length."""
    pipe, device = generator.text_to_image, generator.device

    def timed(fn) -> float:
        samples = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) * 1000)
        return median(samples[1:])

    padded = timed(lambda: pipe.encode_prompt(PROMPT, device=device, do_classifier_free_guidance=False))
    generator.prompts._cache.clear()
    own_length = timed(lambda: (generator.prompts._cache.clear(), generator.prompts.embed(PROMPT)))
    cached = timed(lambda: generator.prompts.embed(PROMPT))
    return {"pad_to_512_ms": padded, "pad_to_prompt_ms": own_length, "cache_hit_ms": cached}


def png_levels(image: Image.Image, runs: int) -> list[tuple[str, float, int]]:
    rows = []
    for level in (0, 1, 3, 6, 9):
        samples, size = [], 0
        for _ in range(runs):
            buffer = io.BytesIO()
            start = time.perf_counter()
            image.save(buffer, format="PNG", compress_level=level)
            samples.append((time.perf_counter() - start) * 1000)
            size = len(buffer.getvalue())
        rows.append((f"PIL, level {level}", median(samples), size // 1024))
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        data = fast_png(image)
        samples.append((time.perf_counter() - start) * 1000)
    rows.append(("the worker's (Up filter, level 1)", median(samples), len(data) // 1024))
    return rows


def photo_like(size: int = 1024) -> Image.Image:
    """A smooth, detailed stand-in for a photograph: blurred noise over gradients (no real photo here)."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, (size // 16, size // 16, 3))
    small = Image.fromarray(np.uint8(np.clip(128 + 40 * noise, 0, 255)))
    base = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.uint8(np.clip(base + grain, 0, 255)))


def cold_start(model: Path, runs: int) -> dict:
    """`python handler.py --test_input` in fresh processes; their logs give each part of the start.

    Each figure is the median over `runs` processes."""
    samples = [one_cold_start(model) for _ in range(runs)]
    return {part: median([sample[part] for sample in samples]) for part in samples[0]}


def one_cold_start(model: Path) -> dict:
    env = {**os.environ, "ZIMAGE_MODEL": str(model), "SAFETY_CHECKER_MODEL": "none"}
    job = json.dumps({"input": {"prompt": "a cat", "size": "512*512"}})
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "handler.py", "--test_input", job],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    wall = (time.perf_counter() - start) * 1000
    log = done.stdout
    parts = {"imports": float(re.search(r"imports took (\d+) ms", log)[1])}
    parts.update(
        {
            name: float(ms)
            for name, ms in re.findall(r"(\w+) (\d+) ms", log.split("ready on", 1)[1].split("\n")[0])
        }
    )
    parts["to_first_job"] = float(re.search(r"cold start: (\d+) ms", log)[1])
    parts["process_wall_incl_one_job"] = round(wall)
    return parts


def write_report(path: Path, sections: list[str]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    header = [
        "# Benchmarks",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- device: {device}; host {platform.machine()}, Python {platform.python_version()}",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}",
        "- command: `python benchmarks/run.py` (medians, milliseconds unless stated)",
        "",
    ]
    text = "\n".join(header + sections) + "\n"
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:  # GPU figures from benchmarks/gpu/report.py outlive a CPU run
        text = replace_section(text, START + old.split(START, 1)[1].split(END, 1)[0] + END)
    path.write_text(text + other_benchmarks(old))


def other_benchmarks(old: str) -> str:
    """Sections that other benchmark scripts wrote, each between `<!-- name:start/end -->`
    markers (the deployed loop, inpainting, LoRAs): kept as they were by a rerun of this one."""
    blocks = re.findall(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", old, flags=re.S)
    kept = [
        re.search(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", old, flags=re.S)[0]
        for name in blocks
        if f"<!-- {name}:start -->" != START
    ]
    return "".join(f"\n{block}\n" for block in kept)


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=list(PRESET_SIZES))
    parser.add_argument("--model", help="an existing model folder (default: build one)")
    parser.add_argument("--compile", action="store_true", help="also measure ZIMAGE_COMPILE=1 (GPU)")
    parser.add_argument("--fp8", action="store_true", help="also measure ZIMAGE_PRECISION=fp8 (GPU)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    device, _ = pick_device()
    workdir = Path(tempfile.mkdtemp(prefix="zimage-bench-"))
    if args.model:
        model = Path(args.model)
    elif device.type == "cuda":
        model = build_full_size(workdir / "zimage-full-size")
    else:
        # In a process of its own: torch ops on this thread would slow every later op on the
        # worker's GPU thread about 1.7x (docs/performance.md, one thread for torch).
        model = workdir / "tiny-zimage"
        subprocess.run([sys.executable, "builder/tiny_model.py", str(model)], cwd=ROOT, check=True)
    kind = "full-size architecture, random bf16 weights" if device.type == "cuda" else "tiny model (CPU)"
    sections = [f"Model: {kind}, at `{model}`.", ""]

    sections += [
        "## Cold start (fresh process, `handler.py --test_input`)",
        "",
        markdown([cold_start(model, args.runs)]),
        "",
    ]

    worker = Worker.start(Settings(model=str(model), safety_checker_model="none"))
    rows = stage_table(worker, tuple(args.sizes), args.runs)
    sections += ["## Text-to-image per preset size (PNG, no bucket, checker off)", "", markdown(rows), ""]
    padding = worker.gpu.call(lambda: prompt_padding(worker.generator, args.runs))  # the GPU thread's torch
    sections += ["## Prompt encoding", "", markdown([padding]), ""]

    for flag, settings in (
        (args.compile, Settings(model=str(model), safety_checker_model="none", compile=True)),
        (args.fp8, Settings(model=str(model), safety_checker_model="none", precision="fp8")),
    ):
        if flag:
            variant = Worker.start(settings)
            label = "compile" if settings.compile else "fp8"
            sections += [
                f"## With {label}",
                "",
                markdown(stage_table(variant, ("1024*1024",), args.runs)),
                "",
            ]

    generated = run_job(worker, "png", {"prompt": PROMPT, "seed": 1})
    output_image = Image.open(io.BytesIO(base64.b64decode(generated["image_url"].split(",", 1)[1])))
    for name, image in (
        ("the model's 1024x1024 output", output_image),
        ("a photo-like 1024x1024 image", photo_like()),
    ):
        table = [{"encoder": enc, "ms": ms, "KiB": kib} for enc, ms, kib in png_levels(image, args.runs)]
        sections += [f"## PNG encoders on {name}", "", markdown(table), ""]
    fmt_rows, photo = [], photo_like()
    for fmt in ("jpeg", "webp"):
        samples = []
        for _ in range(args.runs):
            start = time.perf_counter()
            data = encode_image(photo, fmt, 95)
            samples.append((time.perf_counter() - start) * 1000)
        fmt_rows.append({"format": fmt, "quality": 95, "ms": median(samples), "KiB": len(data) // 1024})
    sections += ["## JPEG and WebP at quality 95", "", markdown(fmt_rows), ""]
    if device.type != "cuda":
        sections += [
            START,
            "## GPU figures",
            "",
            "None here: this run had no GPU, and no GPU figure is written that was not measured. On a",
            "GPU the same command builds the full-size architecture (random bf16 weights, the real",
            "model's speed) and fills these tables for it; the targets for one 1024x1024 job inside",
            "the handler on one H100 are 0.70 s (bf16) and 0.45 s (`--fp8`, `ZIMAGE_PRECISION=fp8`);",
            "add `--compile` to measure regional torch.compile.",
            "",
            "Other measured costs: the safety checker in `benchmarks/results/safety_cost.md`",
            "(`python benchmarks/cost/safety.py`); inpainting against image-to-image in",
            "`benchmarks/results/inpaint_cost.md` (`python benchmarks/cost/inpaint.py`); a 1024x1024",
            "PNG upload to a loopback S3 server is about 10 ms (2.2 MB photo-like image, median of 30,",
            "`tests/test_storage.py`'s server).",
            "`bash benchmarks/gpu.sh` measures every GPU figure in one 8-minute run (docs/performance.md).",
            END,
            "",
        ]
    write_report(args.out, sections)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
