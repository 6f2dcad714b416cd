"""Jobs in flight together on one worker, in-process: one GPU stage at a time, same bytes,
stops that free the GPU at the next step, and faults that fail one job or retire the worker.

The deployed loop (`python handler.py` against a stand-in for Runpod's queue) is covered
in tests/test_job_loop.py; these tests drive `Worker.handle` directly on one event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest
import torch

from src.jobs.worker import Worker
from src.runtime.gpu import GpuStage, Stop, is_cuda_fault
from tests.conftest import data_uri_of, handle_job, png_bytes

SMALL = {"size": "256*256", "num_inference_steps": 2}


def inputs(seed: int, **fields: object) -> dict:
    return {"prompt": f"a lighthouse at dusk, take {seed}", **SMALL, "seed": seed, **fields}


async def together(worker: Worker, jobs: list[dict]) -> list[dict]:
    return await asyncio.gather(*(worker.handle(job) for job in jobs))


class ForwardCounter:
    """Counts transformer passes running at once (the GPU stage must never overlap)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.lock = threading.Lock()
        self.now = self.most = self.calls = 0
        self.hooks = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave),
        ]

    def _enter(self, *args: object) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        time.sleep(0.01)  # widen the window in which an overlap would show

    def _leave(self, *args: object) -> None:
        with self.lock:
            self.now -= 1

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def test_jobs_in_flight_together_give_the_bytes_of_one_at_a_time(worker):
    image = data_uri_of(png_bytes((300, 200), (40, 90, 200)))
    jobs = [
        {"id": "t2i-a", "input": inputs(1)},
        {"id": "i2i", "input": inputs(2, image=image, strength=0.6)},
        {"id": "t2i-b", "input": inputs(3, num_images=2)},
        {"id": "bad", "input": inputs(4, size="1000*1000")},
    ]
    alone = [handle_job(worker, job) for job in jobs]
    counter = ForwardCounter(worker.generator.text_to_image.transformer)
    try:
        at_once = asyncio.run(together(worker, jobs))
    finally:
        counter.remove()
    for one, other in zip(alone, at_once, strict=True):
        assert {k: v for k, v in one.items() if k != "timings"} == {
            k: v for k, v in other.items() if k != "timings"
        }
    assert at_once[3]["error"].startswith("size:")
    assert counter.calls >= 6 and counter.most == 1  # every pass ran, never two at once


def test_an_out_of_memory_job_fails_alone_and_the_job_beside_it_is_unharmed(worker):
    reference = handle_job(worker, {"id": "ref", "input": inputs(7)})

    side = 512 // worker.generator.text_to_image.vae_scale_factor  # the 512*512 job's latent width

    def explode_at_512(module, args, kwargs):
        # Only the 512*512 job runs out of memory; the 256*256 job beside it passes.
        if any(x.shape[-1] == side for x in kwargs.get("x", args[0] if args else [])):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    transformer = worker.generator.text_to_image.transformer
    hook = transformer.register_forward_pre_hook(explode_at_512, with_kwargs=True)
    try:
        failed, fine = asyncio.run(
            together(
                worker,
                [{"id": "oom", "input": inputs(8, size="512*512")}, {"id": "ok", "input": inputs(7)}],
            )
        )
    finally:
        hook.remove()
    assert failed == {
        "error": "out of GPU memory for this request: try a smaller size or fewer images "
        "(the worker freed the memory and keeps serving)"
    }
    assert fine["image_url"] == reference["image_url"]


async def _stop_after_first_step(
    worker: Worker, steps: list[int], fields: dict, stop_set: threading.Event
) -> None:
    first = threading.Event()

    def on_step(done: int, total: int) -> None:
        steps.append(done)
        if done == 1:  # hold the GPU thread here until the stop has reached the job
            first.set()
            assert stop_set.wait(timeout=60), "the stop never reached the job"

    task = asyncio.create_task(worker.run("long", fields, on_step))
    assert await asyncio.to_thread(first.wait, 60), "the job never reached its first step"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def noted_stops(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set once any job's Stop has been set (a platform stop), for the test to wait on."""
    stop_set = threading.Event()
    set_stop = Stop.set

    def noting(stop: Stop) -> None:
        set_stop(stop)
        stop_set.set()

    monkeypatch.setattr(Stop, "set", noting)
    return stop_set


def test_a_stopped_job_ends_at_the_next_step_and_the_next_job_gets_the_gpu(worker, monkeypatch):
    stop_set = noted_stops(monkeypatch)
    steps: list[int] = []
    long_job = {"prompt": "a long one", "size": "512*512", "num_inference_steps": 50, "seed": 1}
    asyncio.run(_stop_after_first_step(worker, steps, long_job, stop_set))
    # Stopped after step 1: step 2's pass finishes, then the check before its callback ends the job.
    assert steps == [1]
    after = handle_job(worker, {"id": "next", "input": inputs(5)})
    assert "image_url" in after
    assert steps == [1]  # the stopped job never ran on after its task ended


async def _cancel_the_waiting_one(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list[int]]:
    # The first job holds the GPU thread at its first step until the second is queued behind it
    # and cancelled: the order is set by events, whatever the machine's speed.
    holding, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        if done == 1:
            holding.set()
            assert release.wait(timeout=60), "the test never released the GPU thread"

    queued = asyncio.Event()
    submit = worker.gpu.run

    async def run_after_noting(work, stop):  # the same stage and thread, with a note
        queued.set()  # `submit` queues the work before its first await, so it is queued once we resume
        return await submit(work, stop)

    monkeypatch.setattr(worker.gpu, "run", run_after_noting)
    waiting_steps: list[int] = []
    first = asyncio.create_task(worker.run("first", inputs(11, num_inference_steps=6), hold))
    try:
        await asyncio.to_thread(holding.wait, 60)  # no torch on that thread: it only waits
        assert holding.is_set(), "the first job never reached its first step"
        queued.clear()
        second = asyncio.create_task(
            worker.run("second", inputs(12), lambda done, total: waiting_steps.append(done))
        )
        await asyncio.wait_for(queued.wait(), 60)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
    finally:
        release.set()
    return await first, waiting_steps


def test_a_job_stopped_while_it_waits_for_the_gpu_never_runs(worker, monkeypatch):
    counter = ForwardCounter(worker.generator.text_to_image.transformer)
    try:
        first, waiting_steps = asyncio.run(_cancel_the_waiting_one(worker, monkeypatch))
        after = handle_job(worker, {"id": "after", "input": inputs(13)})  # queued behind anything left
    finally:
        counter.remove()
    assert "image_url" in first and "image_url" in after
    assert waiting_steps == []
    # One transformer pass a step: the first job's 6 and the next job's 2, none for the stopped one.
    assert counter.calls == 6 + SMALL["num_inference_steps"]


def test_a_cuda_fault_fails_the_job_asks_for_a_new_worker_and_takes_no_more_gpu_work(worker):
    faulty = replace(worker, gpu=GpuStage())  # the same loaded model, its own GPU stage

    def crash(*args: object) -> None:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    hook = worker.generator.text_to_image.transformer.register_forward_pre_hook(crash)
    try:
        failed = handle_job(faulty, {"id": "crash", "input": inputs(1)})
    finally:
        hook.remove()
    assert failed["refresh_worker"] is True
    assert failed["error"].startswith("GPU failure in job crash: this worker can no longer use its GPU")
    assert "illegal memory access" not in failed["error"] and "Traceback" not in failed["error"]
    assert faulty.gpu.faulted
    # A job that reaches this worker before Runpod replaces it fails the same way, at once.
    later = handle_job(faulty, {"id": "later", "input": inputs(2)})
    assert later["refresh_worker"] is True
    assert "image_url" in handle_job(worker, {"id": "healthy", "input": inputs(2)})


@pytest.mark.parametrize(
    ("error", "fault"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), False),
        (torch.AcceleratorError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), True),
        (RuntimeError("shapes cannot be multiplied"), False),
        (ValueError("CUDA error in a message"), False),
    ],
)
def test_which_errors_count_as_gpu_faults(error, fault):
    assert is_cuda_fault(error) is fault
