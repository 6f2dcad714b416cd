"""The benchmark's model sections, one per process: `python benchmarks/gpu/sections.py NAME`.

Every job goes through `Worker.handle` as the platform sends it, and every figure is the
median of the timed jobs after a warm-up job, read from the job's own `timings`. Each job
has a new prompt, since the prompt-embedding cache would otherwise hide the text encoder.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import inspect
import io
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

LAUNCHED = time.time()
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.bench import Config, emit, injected_fault  # noqa: E402 (no model code)

if __name__ == "__main__":
    # A test's fault fires before the model code loads: the section fails or hangs the same way,
    # without seconds of imports first.
    injected_fault(sys.argv[1])

# The cyclic GC paused while torch and diffusers import (as handler.py does): it would walk their
# half a million new objects again and again, about a fifth of the import time.
gc.disable()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.full_size import build_full_size  # noqa: E402
from benchmarks.gpu.modes import lora_folder, lora_settings, newer_modes  # noqa: E402
from benchmarks.run import PROMPT, photo_like  # noqa: E402
from builder.tiny_model import build_tiny_zimage  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

gc.enable()

IMPORTED = time.time()
CONFIG = Config.from_env()
MODEL = CONFIG.model
READY = MODEL / ".bench-complete"  # written once a save has finished: a cut save is rebuilt
IMAGES = CONFIG.work / "images"  # bf16 outputs at the first size, for fp8's and compile's PSNR
CUDA = torch.cuda.is_available()
BACKENDS = (
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "flash",
    "_flash_3",
    "sage",
    "xformers",
)
NOT_MEASURED = {
    **dict.fromkeys(
        ("_flash_3_hub", "flash_hub", "sage_hub"), "downloads its kernel from the Hugging Face hub"
    ),
    "flex": "a reference implementation unless compiled; not a serving option as the worker runs it",
}
GUIDANCE = 3.5
# One event loop for every job: an async worker's locks and queues belong to the loop they
# were first used in, so a new loop per job (asyncio.run) would break the second job.
LOOP = asyncio.new_event_loop()


class WorkerLog(logging.Handler):
    """The worker's own cold-start parts, and the cause behind an 'internal error' reply."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, float] = {}
        self.last_error: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("ready on"):
            self.parts = {f"{name}_ms": float(ms) for name, ms in re.findall(r"(\w+) (\d+) ms", message)}
        if record.exc_info and record.exc_info[1] is not None:
            self.last_error = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"[:300]


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
WORKER_LOG = WorkerLog()
logging.getLogger().addHandler(WORKER_LOG)


def start_worker(**options: Any) -> Worker:
    if not READY.exists():
        raise RuntimeError(f"no model at {MODEL}: the load section did not finish")
    return Worker.start(Settings(model=str(MODEL), safety_checker_model="none", **options))


def handle(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    """One job as the platform sends it; `handle` may be a coroutine function or a plain one."""
    WORKER_LOG.last_error = None
    out = worker.handle({"id": "bench-1", "input": job_input})
    out = LOOP.run_until_complete(out) if inspect.isawaitable(out) else out
    if "error" in out:  # the logged cause says more than "internal error in job ..."
        raise RuntimeError(WORKER_LOG.last_error or out["error"])
    return out


def timed_jobs(worker: Worker, job: dict[str, Any], label: str, runs: int | None = None) -> tuple[dict, list]:
    """A warm-up job, then the timed ones: take i has seed i, so variants are compared pixel to pixel."""
    warm = handle(worker, {"prompt": f"warm-up, {label}", "seed": 1000, **job})
    runs = CONFIG.runs if runs is None else runs
    return warm, [
        handle(worker, {"prompt": f"{PROMPT}, {label}, take {i}", "seed": i, **job}) for i in range(runs)
    ]


def stages(outs: list[dict]) -> dict[str, float]:
    """Median of each stage a job used, and of the total."""
    keys = [key for key in outs[0]["timings"] if key == "total" or any(o["timings"][key] for o in outs)]
    return {f"{key}_ms": round(statistics.median(o["timings"][key] for o in outs), 1) for key in keys}


def pixels(out: dict) -> np.ndarray:
    data = base64.b64decode(out["image_url"].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float | str:
    mse = float(np.mean((a - b) ** 2))
    return "identical" if mse == 0 else round(10 * math.log10(255**2 / mse), 2)


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def reset_peak() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------- sections
def load() -> None:
    """Build the model and save it once, then a fresh process starts the worker on it."""
    if READY.exists():
        emit("load", {"step": "build_and_save", "reused": str(MODEL)})
    else:
        shutil.rmtree(MODEL, ignore_errors=True)
        start = time.perf_counter()
        build_tiny_zimage(MODEL) if CONFIG.tiny else build_full_size(MODEL)
        seconds = time.perf_counter() - start
        READY.touch()
        size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file()) / 1e9
        emit("load", {"step": "build_and_save", "seconds": round(seconds, 1), "disk_gb": round(size, 2)})
    # The files were just written, so they come from the page cache: a deployed cold start
    # reads them from the image's disk or a network volume, which can only be slower.
    env = {**os.environ, "GPU_BENCH_LAUNCHED": str(time.time())}
    done = subprocess.run([sys.executable, __file__, "cold_start"], env=env)
    if done.returncode != 0:
        raise RuntimeError(
            f"the cold-start process exited {done.returncode}; its traceback is above in the log"
        )


def cold_start() -> None:
    """Run by `load` in a new process: from that process's start to a worker ready for jobs."""
    reset_peak()
    worker = start_worker()
    ready = time.time()
    launched = float(os.environ.get("GPU_BENCH_LAUNCHED", LAUNCHED))
    row = {
        "step": "cold_start",
        "process_start_to_ready_s": round(ready - launched, 1),
        "imports_s": round(IMPORTED - launched, 1),
        **WORKER_LOG.parts,
        "peak_gib": peak_gib(),
    }
    if CUDA:
        row["reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    first = handle(worker, {"prompt": PROMPT, "size": CONFIG.sizes[0], "seed": 0})
    emit("load", {**row, "first_job_ms": first["timings"]["total"]})


def text_to_image() -> None:
    worker = start_worker()
    IMAGES.mkdir(parents=True, exist_ok=True)
    for size in CONFIG.sizes:
        reset_peak()
        _, outs = timed_jobs(worker, {"size": size}, size)
        row = {"size": size, **stages(outs), "peak_gib": peak_gib()}
        try:
            bare = bare_diffusers(worker, size)
            row.update(bare_diffusers_ms=bare, worker_over_bare=round(row["total_ms"] / bare, 3))
        except Exception as err:  # the worker's own figures stand without the comparison
            row["bare_diffusers_error"] = f"{type(err).__name__}: {err}"[:300]
        emit("text_to_image", row)
        if size == CONFIG.sizes[0]:
            for i, out in enumerate(outs):
                (IMAGES / f"bf16-{i}.png").write_bytes(base64.b64decode(out["image_url"].split(",", 1)[1]))


def bare_diffusers(worker: Worker, size: str) -> float:
    """The plain diffusers call on the worker's own components: prompt to PIL images."""
    pipe, device = worker.generator.text_to_image, worker.generator.device
    width, height = map(int, size.split("*"))
    samples = []
    for i in range(CONFIG.runs + 1):
        start = time.perf_counter()
        pipe(
            prompt=f"{PROMPT}, bare {size}, take {i}",
            width=width,
            height=height,
            num_inference_steps=8,
            guidance_scale=0.0,
            generator=torch.Generator(device).manual_seed(i),
            output_type="pil",
        )
        if CUDA:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(samples[1:]), 1)


def attention() -> None:
    worker = start_worker()
    transformer = worker.generator.text_to_image.transformer
    chosen = next(
        (
            getattr(m.processor, "_attention_backend", None)
            for m in transformer.modules()
            if getattr(m, "processor", None) is not None
        ),
        None,
    )
    chosen = getattr(chosen, "value", chosen) or "native"
    references: dict[float, np.ndarray] = {}
    for backend in dict.fromkeys((chosen, *BACKENDS)):
        base = {"backend": backend, "worker_default": backend == chosen}
        try:
            transformer.set_attention_backend(backend)
        except Exception as err:  # not installed, or not for this GPU: a row, not a stop
            emit("attention", {**base, "error": f"{type(err).__name__}: {err}"})
            continue
        for guidance in (0.0, GUIDANCE):
            try:
                _, outs = timed_jobs(
                    worker,
                    {"size": CONFIG.sizes[0], "guidance_scale": guidance},
                    f"attention {guidance}",
                    min(CONFIG.runs, 3),
                )
            except Exception as err:  # guidance > 0 builds an attention mask that flash backends refuse
                emit("attention", {**base, "guidance": guidance, "error": f"{type(err).__name__}: {err}"})
                continue
            image = pixels(outs[0])
            reference = references.setdefault(guidance, image)
            emit(
                "attention",
                {**base, "guidance": guidance, **stages(outs), "psnr_vs_first_db": psnr(image, reference)},
            )
    for backend, reason in NOT_MEASURED.items():
        emit("attention", {"backend": backend, "skipped": reason})


def accelerated(variant: str, **options: Any) -> None:
    """Start the worker with its own option, then the first size's jobs, compared with bf16's pixels."""
    cache = CONFIG.work / "inductor-cache"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # the worker keeps a value already set
    warm_cache = cache.is_dir() and any(cache.iterdir())
    start = time.perf_counter()
    worker = start_worker(**options)
    start_s = round(time.perf_counter() - start, 1)
    transformer = worker.generator.text_to_image.transformer
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    applied = {
        "fp8": any("float8" in type(m.weight).__name__.lower() for m in linears),
        "compile": any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules()),
    }[variant]
    # The start first: a compile that eats the box still leaves how long it took to start.
    start_row = {"table": "start", "variant": variant, "applied": applied, "worker_start_s": start_s,
                 "accelerate_ms": WORKER_LOG.parts.get("accelerate_ms"),
                 "warm_up_ms": WORKER_LOG.parts.get("warm_up_ms")}  # fmt: skip
    if variant == "compile":
        start_row["inductor_cache_was_warm"] = warm_cache
    emit(variant, start_row)
    size = CONFIG.sizes[0]
    warm, outs = timed_jobs(worker, {"size": size}, size)
    row = {"variant": variant, "size": size, "first_job_ms": warm["timings"]["total"], **stages(outs)}
    bf16 = [path for i in range(len(outs)) if (path := IMAGES / f"bf16-{i}.png").exists()]
    if len(bf16) == len(outs):
        scores = [
            psnr(pixels(out), np.asarray(Image.open(path), dtype=np.float64))
            for out, path in zip(outs, bf16, strict=True)
        ]
        numeric = [s for s in scores if isinstance(s, float)]
        row["psnr_vs_bf16_db_min"] = min(numeric) if numeric else "identical"
    else:
        row["psnr_vs_bf16_db_min"] = "no bf16 images (text_to_image did not finish)"
    emit(variant, row)


def fp8() -> None:
    accelerated("fp8", precision="fp8")


def compile_blocks() -> None:
    accelerated("compile", compile=True)


def modes() -> None:
    loras = lora_folder(CONFIG.work / "loras", MODEL)
    worker = start_worker(**lora_settings(loras))
    size = CONFIG.sizes[0]
    width, height = map(int, size.split("*"))
    source = IMAGES / "bf16-0.png"
    picture = Image.open(source) if source.exists() else photo_like(max(width, height))
    buffer = io.BytesIO()
    picture.convert("RGB").resize((width, height)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    _, plain = timed_jobs(worker, {"size": size}, size)
    emit("modes", {"mode": "text_to_image", "size": size, **stages(plain)})
    _, outs = timed_jobs(worker, {"size": size, "image": image, "strength": 0.8}, f"i2i {size}")
    emit("modes", {"mode": "image_to_image", "size": size, "strength": 0.8, **stages(outs)})
    reset_peak()
    _, outs = timed_jobs(worker, {"size": size, "num_images": 4}, f"x4 {size}", max(1, min(CONFIG.runs, 3)))
    row = {"mode": "num_images 4", "size": size, **stages(outs), "peak_gib": peak_gib()}
    emit("modes", {**row, "per_image_ms": round(row["total_ms"] / 4, 1)})
    for mode in newer_modes(image, width, height):
        name = mode.name
        if mode.skipped:
            emit("modes", {"mode": name, "skipped": mode.skipped})
            continue
        try:
            reset_peak()
            # On the GPU thread, where the worker runs all its torch work (src/runtime/gpu.py).
            added = worker.gpu.call(partial(mode.prepare, worker)) if mode.prepare is not None else {}
            runs = min(CONFIG.runs, mode.runs) if mode.runs else None
            _, outs = timed_jobs(worker, {"size": size, **mode.job}, f"{name} {size}", runs)
            # The output's size (outpainting makes its own) and the price a caller pays for it.
            made = f"{outs[0]['width']}*{outs[0]['height']}"
            row = {"mode": name, "size": made, **stages(outs), "cost": outs[0]["cost"]}
            over = round(row["total_ms"] - stages(plain)["total_ms"], 1)
            emit("modes", {**row, "over_plain_ms": over, "peak_gib": peak_gib(), **added})
        except Exception as err:  # a mode that exists but fails here is a row, the next one still runs
            emit("modes", {"mode": name, "error": f"{type(err).__name__}: {err}"[:300]})


def memory_plans() -> None:
    from benchmarks.gpu.memory import run  # it imports this module's helpers

    run()


def upscaling() -> None:
    from benchmarks.gpu.upscaling import run  # it imports this module's helpers

    run()


SECTIONS = {
    "load": load,
    "cold_start": cold_start,
    "text_to_image": text_to_image,
    "attention": attention,
    "fp8": fp8,
    "compile": compile_blocks,
    "modes": modes,
    "memory": memory_plans,
    "upscaling": upscaling,
}

if __name__ == "__main__":
    SECTIONS[sys.argv[1]]()
