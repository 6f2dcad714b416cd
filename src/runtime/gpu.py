"""The GPU stage: one job at a time, stoppable, with its faults told apart.

Every job's GPU work (LoRA activation, prompt, denoise, decode, composite, safety, the
conversion to bytes) runs as one function on a single dedicated thread, so the event loop
keeps taking jobs, sending heartbeats and receiving stop signals meanwhile, and two jobs
never share the GPU. Work waits its turn in that thread's queue, in the order it arrived.

That thread is the only one that runs torch, loading and warm-up included (`call`): torch
keeps a team of OpenMP threads for each thread that runs its ops, and two teams on the same
cores slow every op in the process (1.7x measured on a 2-core CPU). I/O threads fetch, read
files, encode pictures with PIL and upload; they run no torch op.

A stopped job (the SDK cancels its task) sets its `Stop`; the running function notices at
the next denoising step and raises `JobStopped`. The GPU is handed to the next job only
once that function has really returned, so a stop never overlaps two jobs on the GPU.

Out of memory frees the memory and fails that job alone. Any other CUDA error leaves the
process unable to use the GPU: the job fails with `GpuFault`, and the worker asks Runpod
to replace it (`refresh_worker`) instead of failing every later job.
"""

from __future__ import annotations

import asyncio
import gc
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from src.runtime.errors import JobError

T = TypeVar("T")

# What CUDA, cuBLAS and cuDNN put in errors that poison the context; torch >= 2.8 raises
# most of them as AcceleratorError, older paths as a plain RuntimeError with this text.
_CUDA_FAULT = re.compile(
    r"CUDA error|CUDA driver error|CUBLAS_STATUS|cuDNN error|CUDNN_STATUS|device-side assert"
    r"|illegal memory access|unspecified launch failure|NCCL error",
    re.IGNORECASE,
)

OUT_OF_MEMORY = (
    "out of GPU memory for this request: try a smaller size or fewer images "
    "(the worker freed the memory and keeps serving)"
)


class JobStopped(Exception):
    """The platform stopped this job (a cancel or the execution timeout)."""


class GpuOutOfMemory(JobError):
    """This job needed more GPU memory than there was; the next job is unaffected."""


class GpuFault(Exception):
    """A CUDA error after which this process cannot trust the GPU any more."""


class Stop:
    """A job's stop flag, set from the event loop and read on the GPU or I/O threads."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise JobStopped


def is_cuda_fault(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return False
    return isinstance(err, torch.AcceleratorError) or (
        isinstance(err, RuntimeError) and bool(_CUDA_FAULT.search(str(err)))
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GpuStage:
    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self.faulted = False  # set once; a faulted worker takes no more GPU work

    def call(self, work: Callable[[], T]) -> T:
        """`work` on the GPU thread, blocking the caller: start-up, before any job runs."""
        return self._thread.submit(work).result()

    async def run(self, work: Callable[[], T], stop: Stop) -> T:
        """Run `work` on the GPU thread when its turn comes; stoppable while it waits or runs."""
        if self.faulted:
            raise GpuFault("an earlier job left the GPU in a failed state")
        return await run_stoppable(self._thread, self._guarded, stop, work)

    def _guarded(self, work: Callable[[], T]) -> T:
        out_of_memory = False
        try:
            return work()
        except torch.OutOfMemoryError:
            out_of_memory = True
        except Exception as err:
            if is_cuda_fault(err):
                self.faulted = True
                raise GpuFault(type(err).__name__) from err
            raise
        finally:
            if out_of_memory:  # after the except block, so the traceback's tensors are gone too
                free_memory()
        raise GpuOutOfMemory(OUT_OF_MEMORY)


async def run_stoppable(
    executor: ThreadPoolExecutor | None, fn: Callable[..., T], stop: Stop, *args: object
) -> T:
    """`fn(*args)` on `executor`'s thread. When the awaiting task is cancelled, `stop` is set
    and the cancel waits until `fn` has returned (or is dropped before it started), so the
    job's memory and the GPU are really free when the job ends."""
    future: Future[T] = (executor or _io_threads).submit(fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        stop.set()
        if not future.cancel():  # already running: it ends at its next stop check
            await asyncio.wait([asyncio.wrap_future(future)])
        raise


# Fetches, image encoding and uploads; a job has at most a few of these at once.
_io_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="io")
