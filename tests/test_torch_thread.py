"""Every torch op of the worker runs on its one GPU thread: warm-up, every mode, LoRAs, depth, safety.

Torch keeps a team of OpenMP threads per thread that runs its ops; once a second thread has run
them, every CPU op in the process is about 1.7x slower (src/runtime/gpu.py). The worker here has every
part loaded (a 2.1 ControlNet, the depth model, the safety checker, a LoRA folder); a global
forward pre-hook records the thread of every module call, and spies record the thread of each
place that turns pictures into tensors or back, converts LoRA tensors, preprocesses for the
checker, or (on a GPU) waits for the GPU to time a stage. Jobs of every mode then run side by
side, so I/O threads fetch and encode meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import src.control.preprocess
import src.jobs.worker
import src.lora.adapters
import src.model.inpaint
import src.model.pipeline
import src.model.safety
from src.jobs.worker import Worker
from src.runtime.settings import Settings
from src.runtime.timing import Stopwatch
from tests.test_control import CONTROL, IMAGE, MASK
from tests.tiny_controlnets import build_tiny_depth, save_controlnet
from tests.tiny_loras import make_lora, save_lora

# Where pictures become tensors or back, LoRA tensors are converted, and the checker's input is made.
SPIED = (
    (src.jobs.worker, "from_pil"),
    (src.jobs.worker, "to_pil"),
    (src.model.pipeline, "to_bytes"),
    (src.model.inpaint, "from_pil"),
    (src.model.inpaint, "to_bytes"),
    (src.lora.adapters.LoraAdapters, "convert"),
    (src.model.safety.Preprocessing, "__call__"),
    (src.control.preprocess.DepthEstimator, "__call__"),
)

JOBS = {
    "text-to-image": {},
    # Enough steps for the step cache to forecast some (its hooks and forecasts are torch work too).
    "text-to-image, acceleration high": {"acceleration": "high", "num_inference_steps": 6},
    "image-to-image": {"image": IMAGE, "strength": 0.6},
    "strength 0": {"image": IMAGE, "strength": 0.0},
    "inpainting": {"image": IMAGE, "mask": MASK},
    "control, canny": {"control_image": CONTROL, "control_preprocess": "canny"},
    "inpainting with control, depth": {
        "image": IMAGE,
        "mask": MASK,
        "control_image": CONTROL,
        "control_preprocess": "depth",
    },
}


class Threads:
    """Which threads ran what: a name per call, recorded under a lock (the recorders run anywhere)."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def record(self, what: str) -> None:
        with self._lock:
            self.seen.setdefault(what, set()).add(threading.get_ident())

    def spy(self, owner: object, name: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def spied(*args, **kwargs):
            self.record(f"{getattr(owner, '__name__', owner)}.{name}")
            return original(*args, **kwargs)

        setattr(owner, name, spied)

    def idents(self) -> set[int]:
        return set().union(*self.seen.values())


@pytest.fixture(scope="module")
def recorded(tiny_model: Path, never_flags: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("torch-thread")
    _, controlnet_file = save_controlnet(tiny_model, "2.1", root / "controlnet")
    loras = root / "loras"
    loras.mkdir()
    save_lora(*make_lora(tiny_model, seed=4), loras / "style.safetensors", "kohya")
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model=str(never_flags),
        controlnet_model=str(controlnet_file),
        depth_model=str(build_tiny_depth(root / "depth")),
        lora_dirs=(str(loras),),
        lora_cache_dir=str(root / "cache"),
    )
    threads = Threads()
    patch = pytest.MonkeyPatch()
    for owner, name in SPIED:
        patch.setattr(owner, name, getattr(owner, name))  # so undo() puts the original back
        threads.spy(owner, name)
    # On a GPU a lap that waits for it is torch work too (cuda.synchronize): GPU thread only.
    lap = Stopwatch.lap

    def waiting_lap(clock: Stopwatch, name: str, *, sync: bool = True) -> None:
        if sync:
            threads.record("Stopwatch.lap, waiting for the GPU")
        lap(clock, name, sync=sync)

    patch.setattr(Stopwatch, "lap", waiting_lap)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: threads.record(f"forward {type(module).__name__}")
    )
    try:
        worker = Worker.start(settings)  # warm-up included
        warm_up = Threads()
        warm_up.seen, threads.seen = threads.seen, {}
        yield worker, warm_up, threads
    finally:
        hook.remove()
        patch.undo()


async def every_mode(worker: Worker) -> list[dict]:
    base = {"prompt": "a lighthouse", "size": "256*256", "num_inference_steps": 2, "seed": 5}
    lora = {"loras": [{"path": "style.safetensors", "scale": 0.7}]}
    jobs = [
        worker.handle({"id": f"{name} {i}", "input": {**base, **fields, **(lora if i else {})}})
        for name, fields in JOBS.items()
        for i in range(2)
    ]
    return await asyncio.gather(*jobs)


def test_warm_up_runs_torch_on_the_gpu_thread(recorded):
    worker, warm_up, _ = recorded
    gpu_thread = worker.gpu.call(threading.get_ident)
    assert "forward ZImageTransformer2DModel" in warm_up.seen
    assert "forward ZImageControlNetModel" in warm_up.seen  # the control pipeline is warmed up too
    assert warm_up.idents() == {gpu_thread}, warm_up.seen


def test_jobs_of_every_mode_side_by_side_run_torch_on_the_gpu_thread_only(recorded):
    worker, _, threads = recorded
    outputs = asyncio.run(every_mode(worker))
    assert all("error" not in output for output in outputs), outputs
    gpu_thread = worker.gpu.call(threading.get_ident)
    # Every recorder fired: the modules of each part, and each conversion spied on.
    for what in (
        "forward ZImageTransformer2DModel",
        "forward Decoder",  # the VAE's
        "forward Encoder",
        "forward ZImageControlNetModel",
        "forward DepthAnythingForDepthEstimation",
        "LoraAdapters.convert",
        "Preprocessing.__call__",
        "DepthEstimator.__call__",
        "src.jobs.worker.to_pil",
        "src.jobs.worker.from_pil",
        "src.model.inpaint.from_pil",
        "Stopwatch.lap, waiting for the GPU",
    ):
        assert what in threads.seen, (what, sorted(threads.seen))
    assert any(name.startswith("forward") and "Classification" in name for name in threads.seen)
    others = {what: idents - {gpu_thread} for what, idents in threads.seen.items() if idents - {gpu_thread}}
    assert not others, f"torch work off the GPU thread: {sorted(others)}"
    assert threading.get_ident() != gpu_thread
    # The LoRA jobs changed the picture, so the adapters really ran (on that thread).
    first, with_lora = (np.frombuffer(o["image_url"].encode(), dtype=np.uint8) for o in outputs[:2])
    assert first.tobytes() != with_lora.tobytes()
