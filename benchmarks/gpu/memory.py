"""The memory section of `bash benchmarks/gpu.sh`: the plans on emulated 16 and 24 GB cards.

On the GPU, each card is emulated by capping this process with
`torch.cuda.set_per_process_memory_fraction` and starting the worker with the matching
GPU_MEMORY_GB, so `auto` plans for that card. The worst accepted jobs then run once each
(2048x2048 x 4 images with guidance, and 1024x1024 with a LoRA and guidance: the bench has one
random LoRA file, and a request may not name one twice), and each row
records the plan, the peak `max_memory_allocated`, the estimator's figure for that job, the
seconds and whether it ran out of memory. Then each plan, forced on the whole card, times a
1024x1024 job beside `resident`. With --tiny (the CPU), the "cards" are budgets just above each
plan's need on the tiny model, and the jobs are small: the code paths, not the figures.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.gpu.bench import emit
from benchmarks.gpu.modes import LORA_FILE, lora_folder, lora_settings
from benchmarks.gpu.sections import (
    CONFIG,
    CUDA,
    MODEL,
    handle,
    peak_gib,
    reset_peak,
    start_worker,
    timed_jobs,
)
from src.jobs.worker import Worker
from src.model import memory
from src.model.memory import GB, PLANS, TABLE, MemoryRefusal
from src.model.placement import worst_job
from src.runtime.settings import Settings

CARDS_GB = (16, 24)
GUIDANCE = 3.5


def worst_jobs(tiny: bool) -> dict[str, dict[str, Any]]:
    big, size = ("256*256", "256*256") if tiny else ("2048*2048", "1024*1024")
    steps = {"num_inference_steps": 2} if tiny else {}
    lora = [{"path": LORA_FILE, "scale": 1.0}]
    return {
        f"{big} x4, guidance": {"size": big, "num_images": 4, "guidance_scale": GUIDANCE, **steps},
        f"{size}, a LoRA, guidance": {"size": size, "loras": lora, "guidance_scale": GUIDANCE, **steps},
    }


def estimate(worker: Worker, job_input: dict[str, Any]) -> float:
    """The estimator's peak for this job under the worker's plan, in GiB."""
    placed = worker.placement
    width, height = map(int, job_input["size"].split("*"))
    job = memory.Job(
        width=width,
        height=height,
        images=job_input.get("num_images", 1),
        guidance=job_input.get("guidance_scale", 0) > 0,
        control=False,
        loras=placed.choice.lora_slots,  # the slots the plan keeps loaded
        expansion=False,
        upscale=False,
    )
    plan = placed.choice.plan
    batch = memory.largest_batch(plan, placed.parts, placed.shapes, job, placed.budget)
    return round(memory.need(plan, placed.parts, placed.shapes, job, batch) / GB, 3)


def cards() -> dict[str, float]:
    """GB budgets: the real card sizes on a GPU; on the CPU, just above each plan's tiny need."""
    if CUDA:
        return {f"{card} GB": float(card) for card in CARDS_GB}
    placed = start_worker().placement
    # With the fewest LoRA slots: with more, an earlier plan with fewer slots would fit the budget.
    job = replace(worst_job(Settings.lora_max_loaded), loras=memory.MIN_LORA_SLOTS)
    # Two "cards", as on the GPU: one that fits `sliced`, one that only `fp8` fits.
    return {
        f"tiny, fits {name}": memory.need(TABLE[name], placed.parts, placed.shapes, job) / GB
        for name in ("sliced", "fp8")
    }


def on_card(card: str, budget_gb: float, loras: dict[str, Any]) -> None:
    if CUDA:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total))
        torch.cuda.empty_cache()
    try:
        started = time.perf_counter()
        worker = start_worker(gpu_memory_gb=budget_gb, **loras)
    except MemoryRefusal as refused:
        emit("memory", {"card": card, "refused": str(refused)[:300]})
        return
    plan, slots = worker.placement.choice.plan.name, worker.placement.choice.lora_slots
    start_s = round(time.perf_counter() - started, 2)
    emit("memory", {"card": card, "step": "start", "plan": plan, "lora_slots": slots, "start_s": start_s})
    for name, job_input in worst_jobs(not CUDA).items():
        reset_peak()
        started = time.perf_counter()
        row: dict[str, Any] = {
            "card": card,
            "job": name,
            "plan": plan,
            "estimate_gib": estimate(worker, job_input),
        }
        try:
            handle(worker, {"prompt": f"memory, {name}", "seed": 1, "output_format": "jpeg", **job_input})
            row["oom"] = False
        except Exception as err:  # an out-of-memory is a row, and the next job still runs
            row["oom"] = "out of memory" in str(err).lower()
            row["error"] = f"{type(err).__name__}: {err}"[:200]
        emit("memory", {**row, "seconds": round(time.perf_counter() - started, 2), "peak_gib": peak_gib()})
    del worker
    if CUDA:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def plan_times(loras: dict[str, Any]) -> None:
    """Each plan forced on the whole card: one 1024x1024 job's time beside resident's."""
    size = "256*256" if not CUDA else "1024*1024"
    resident = None
    for plan in PLANS:
        worker = start_worker(memory_plan=plan, **loras)
        _, outs = timed_jobs(worker, {"size": size}, f"plan {plan}", max(1, min(CONFIG.runs, 2)))
        total = sorted(out["timings"]["total"] for out in outs)[len(outs) // 2]
        resident = resident or total
        emit(
            "memory",
            {"plan": plan, "size": size, "total_ms": total, "vs_resident": round(total / resident, 3)},
        )
        del worker
        if CUDA:
            torch.cuda.empty_cache()


def run() -> None:
    loras = lora_settings(lora_folder(CONFIG.work / "loras", MODEL))
    for card, budget in cards().items():
        on_card(card, budget, loras)
    plan_times(loras)
