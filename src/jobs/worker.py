"""The worker: everything loaded once at start, then one `await handle(job)` per job.

A job is one straight line: parse; fetch inputs; on the GPU (one job at a time, see
src/runtime/gpu.py) generate and check; encode; deliver. Up to MAX_CONCURRENCY jobs are in
flight, so one job's fetches, encoding and upload overlap another's GPU stage.

`handle` is where a job arrives (its `s3Config`, Runpod's per-job bucket, goes to delivery as
storage credentials) and the one place where failures become `{"error": ...}`: a `JobError`
passes its message through (out of GPU memory is one, after the memory is freed); a GPU fault
also asks Runpod to replace the worker; anything else is logged with its traceback and
reported as a short internal error. The worker keeps serving after every one of them.
A stopped job raises `CancelledError` through it, as the SDK expects, and returns nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from PIL import Image

from src.control.pose import PoseEstimator, no_pose_model
from src.control.preprocess import DepthEstimator, load_control, no_depth_model
from src.delivery.buckets import Bucket, job_bucket
from src.delivery.encoding import data_uri, encode_image
from src.delivery.storage import Storage, Storages
from src.inputs.pictures import Inputs, load_inputs, open_input
from src.jobs import startup
from src.jobs.output import job_output
from src.jobs.progress import progress_reporter
from src.jobs.slots import Delivery
from src.jobs.startup import ServedModel
from src.lora.adapters import LoraAdapters, PreparedLora
from src.model import acceleration
from src.model.expander import PromptExpander, no_expander
from src.model.family import load_family
from src.model.files import SearchRoots
from src.model.inpaint import keeps_everything
from src.model.modes import mode_of
from src.model.pipeline import StepCallback, ZImageGenerator, pick_device, to_pil
from src.model.pixels import from_pil
from src.model.placement import Placement
from src.model.safety import SafetyChecker
from src.request.models import MODELS
from src.request.parse import parse_request
from src.request.schema import MAX_SEED, GenerateRequest
from src.request.sizes import AUTO
from src.runtime.errors import JobError, error_output
from src.runtime.gpu import GpuFault, GpuStage, Stop, run_stoppable
from src.runtime.settings import Settings
from src.runtime.timing import Stopwatch

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Worker:
    settings: Settings
    # The models this worker loaded, by the request's `model` name (the default one first).
    models: dict[str, ServedModel]
    safety: SafetyChecker | None
    storage: Storage | None
    gpu: GpuStage = field(default_factory=GpuStage)
    # control_preprocess "depth"; None without a ControlNet or with DEPTH_MODEL=none.
    depth: DepthEstimator | None = None
    # control_preprocess "pose"; None without a ControlNet or with POSE_MODEL=none.
    pose: PoseEstimator | None = None
    # enable_prompt_expansion; None with PROMPT_EXPANDER_MODEL=none.
    expander: PromptExpander | None = None
    # The memory plan in force and where each part lives (src/model/placement.py).
    placement: Placement | None = None
    # Jobs past the GPU stage; the job loop lets the next job take their slots (src/jobs/slots.py).
    delivery: Delivery | None = None
    # The clients of jobs' own buckets (`s3Config`), by credentials.
    storages: Storages = field(default_factory=Storages)

    def __post_init__(self) -> None:
        if self.delivery is None:
            self.delivery = Delivery(bound=self.settings.max_concurrency)

    @property
    def generator(self) -> ZImageGenerator:
        """The first served model's generator (every model runs on the same device)."""
        return next(iter(self.models.values())).generator

    @property
    def loras(self) -> LoraAdapters:
        """The first served model's adapters."""
        return next(iter(self.models.values())).loras

    @classmethod
    def start(
        cls, settings: Settings, roots: SearchRoots | None = None, gpu: GpuStage | None = None
    ) -> Worker:
        """Load everything a job needs on the GPU thread, where every later torch op runs too.

        Torch keeps a team of OpenMP threads per thread that runs it: once a second thread has
        run torch ops, every CPU op in the process slows down (measured 1.7x on a 2-core CPU,
        BENCHMARKS.md), and on a GPU the thread that launches kernels pays for it. So loading,
        warm-up and every job's torch work share the one GPU thread (src/runtime/gpu.py).
        """
        gpu = gpu or GpuStage()  # the start's own, when its fitness checks ran there already
        return gpu.call(partial(cls._load, settings, roots, gpu))

    @classmethod
    def _load(cls, settings: Settings, roots: SearchRoots | None, gpu: GpuStage) -> Worker:
        """Each part of the cold start in order (src/jobs/startup.py), each timed and logged."""
        device, dtype = pick_device()
        clock = Stopwatch(device)
        roots = roots or SearchRoots(allow_download=settings.allow_download)
        pipes = load_family(settings, roots, dtype)
        clock.lap("load_weights")
        control = startup.load_control_models(
            settings, pipes[next(iter(pipes))].transformer, device, dtype, roots
        )
        if control.controlnet is not None or control.tile_controlnet is not None:
            clock.lap("load_control")
        weights = startup.weigh(settings, pipes, control, device)  # may refuse: too little memory
        models = startup.serve_models(settings, pipes, control, device, clock)  # its own laps
        safety = startup.load_safety(settings, roots, device, dtype)
        clock.lap("load_safety_checker")
        expander = startup.load_expander(settings, roots, models)
        if expander is not None:
            clock.lap("load_prompt_expander")
        placement = startup.plan_memory(settings, weights, models, control, safety, expander)
        clock.lap("plan_memory")
        storage = Storage(settings) if settings.storage_enabled else None
        clock.lap("connect_storage")
        startup.warm_up(models)
        if expander is not None:
            expander.warm_up()
        clock.lap("warm_up")
        parts = ", ".join(f"{name} {ms:.0f} ms" for name, ms in clock.timings.items())
        log.info("ready on %s (%s): %s", device, str(dtype).removeprefix("torch."), parts)
        return cls(
            settings,
            models,
            safety,
            storage,
            gpu=gpu,
            depth=control.depth,
            pose=control.pose,
            expander=expander,
            placement=placement,
        )

    async def handle(self, job: dict[str, Any], inline: bool = False) -> dict[str, Any]:
        """The SDK's handler: a job's output, or the one error shape; the worker serves on.

        `inline` returns data URIs even on a worker with a bucket (a caller that wants the bytes).
        """
        job_id = str(job.get("id", "local"))
        try:
            # Runpod's per-job bucket (checked on a thread: its endpoint's host is resolved).
            s3_config = job.get("s3Config")
            bucket = None if s3_config is None else await asyncio.to_thread(job_bucket, s3_config)
            progress = progress_reporter(job, self.settings)
            return await self.run(job_id, job.get("input"), progress, inline, bucket)
        except JobError as err:
            log.info("job %s failed: %s", job_id, err)
            return error_output(str(err))
        except GpuFault:
            log.exception("job %s: GPU fault; asking Runpod to replace this worker", job_id)
            return error_output(
                f"GPU failure in job {job_id}: this worker can no longer use its GPU and is being "
                "replaced; send the job again",
                refresh_worker=True,
            )
        except asyncio.CancelledError:
            log.info("job %s stopped by the platform: nothing was uploaded", job_id)
            raise
        except Exception:
            log.exception("job %s: unexpected error", job_id)
            return error_output(
                f"internal error in job {job_id}; the worker logged the details and keeps serving"
            )

    @staticmethod
    async def _timed(clock: Stopwatch, stage: str, fn: Callable[..., T], stop: Stop, *args: Any) -> T:
        """`fn` on an I/O thread, its time added to `stage` (fetches run side by side)."""
        started = time.perf_counter()
        try:
            return await run_stoppable(None, fn, stop, *args)
        finally:
            clock.add(stage, (time.perf_counter() - started) * 1000)

    async def run(
        self,
        job_id: str,
        raw_input: Any,
        on_step: StepCallback | None = None,
        inline: bool = False,
        bucket: Bucket | None = None,
    ) -> dict[str, Any]:
        """One job, start to end. Only the GPU stage waits for other jobs; the rest overlaps them.

        `bucket`: the job's own (its `s3Config`), used instead of the worker's, never falling back.
        """
        clock = Stopwatch(self.generator.device)
        stop = Stop()
        request = parse_request(raw_input).with_prompt(self.settings.upscale_prompt)
        served = self._served(request)
        seed = request.seed if request.seed >= 0 else secrets.randbelow(MAX_SEED + 1)
        log.info(
            "job %s: %s, %s, prompt %d chars sha256 %s, %s x%d, %d steps, acceleration %s, seed %d",
            job_id,
            request.model,
            mode_of(request).name,
            len(request.prompt),
            hashlib.sha256(request.prompt.encode()).hexdigest()[:12],
            request.size,
            request.num_images,
            request.num_inference_steps,
            request.acceleration,
            seed,
        )

        # 1. `size: "auto"`: the picture that decides it is opened first (EXIF-rotated), once.
        opened: dict[str, Image.Image] = {}
        if request.size == AUTO:
            field = request.auto_source
            stage = "load_input" if field == "image" else "preprocess_control"
            picture = await self._timed(clock, stage, open_input, stop, getattr(request, field), field)
            opened[field] = picture
            request = request.with_auto_size(picture.size)  # of the canvas, with `outpaint`
            log.info("job %s: size auto: %s %dx%d -> %s", job_id, field, *picture.size, request.size)

        # 2. Fetch at once: the input image and mask fitted to the size, the control map (fitted,
        #    and canny applied), and the LoRA files (downloaded or cached, read unless loaded).
        try:
            inputs, control, loras = await asyncio.gather(
                self._timed(clock, "load_input", load_inputs, stop, request, opened.get("image")),
                self._timed(
                    clock, "preprocess_control", load_control, stop, request, opened.get("control_image")
                )
                if request.control_image
                else asyncio.sleep(0, result=None),
                self._timed(clock, "load_loras", served.loras.prepare, stop, request.loras, stop)
                if request.loras
                else asyncio.sleep(0, result=[]),
            )
        except Exception:
            stop.set()  # the other fetches, if still running, end at their next check
            raise
        inputs = replace(inputs, control=control)
        for name, ms in inputs.laps.items():  # stages inside the loading (an upscale's resample)
            clock.move("load_input", name, ms)
        clock.restart()

        # 3. On the GPU, one job at a time: generate, check safety, bring the kept images to the host.
        def step(done: int, total: int) -> None:
            stop.check()  # a stopped job ends here, between two denoising steps
            if on_step is not None:
                on_step(done, total)

        work = partial(self._on_gpu, request, seed, inputs, loras, clock, step)
        kept, images, flags, expanded = await self.gpu.run(work, stop)

        # 4. Encode and deliver, giving the slot to the next job meanwhile.
        #    Off the GPU thread, so no lap waits for the GPU (it may be running another job).
        with self.delivery.delivering():
            encoded = await run_stoppable(None, self._encode, stop, images, request)
            clock.lap("encode_image", sync=False)
            urls = await run_stoppable(
                None, self._deliver, stop, job_id, encoded, request, inline, stop, bucket
            )
            clock.lap("upload", sync=False)
        return job_output(self.settings, request, seed, kept, urls, flags, clock, expanded)

    def _on_gpu(
        self,
        request: GenerateRequest,
        seed: int,
        inputs: Inputs,
        loras: list[PreparedLora],
        clock: Stopwatch,
        step: StepCallback,
    ) -> tuple[list[int], list[Image.Image], list[bool], str | None]:
        clock.lap("wait_gpu")  # behind other jobs; reported in no stage, only in `total`
        served = self.models[request.model]
        served.loras.activate(loras)  # exactly this job's adapters, or none: the base weights
        if loras:
            clock.lap("load_loras")
        # The preprocessors that run on the device (canny ran on the CPU, in load_control).
        on_device = {"depth": self.depth, "pose": self.pose}.get(request.control_preprocess)
        if on_device is not None:
            inputs = replace(inputs, control=on_device(inputs.control))
            clock.lap("preprocess_control")
        expanded = None
        if inputs.image is not None and (request.strength == 0 or keeps_everything(inputs.mask)):
            # strength 0 or an all-black mask returns the fitted input untouched by the model.
            # As a [0, 1] tensor, which the checker reads and to_pil turns back into the same bytes.
            fitted = from_pil(inputs.image, served.generator.device) / 255
            images = fitted.repeat(request.num_images, 1, 1, 1)
            clock.lap("decode")  # the fitted input, as the tensor the checker reads
        else:
            if request.enable_prompt_expansion and self.expander is not None:
                # Before encoding: the images are made from the rewrite (or the prompt, when empty).
                expanded = self.expander.expand(request.prompt, seed).text
                request = request.model_copy(update={"prompt": expanded or request.prompt})
                clock.lap("expand_prompt")
            images = served.generator.generate(request, seed, clock, inputs, step)

        # Every image is checked in one batch; flagged ones are dropped before encoding.
        flags = [False] * request.num_images
        if request.enable_safety_checker and self.safety is not None:
            flags = self.safety.flags(images)
            clock.lap("safety")
        kept = [i for i, flagged in enumerate(flags) if not flagged]
        if not kept:
            raise JobError(
                f"safety: all {len(flags)} generated image(s) were flagged as NSFW by the safety checker "
                "and dropped; nothing was returned or charged. Try another prompt or seed."
            )
        return kept, to_pil(images[kept]), flags, expanded

    def _served(self, request: GenerateRequest) -> ServedModel:
        """The request's model; a request this worker cannot serve fails before anything is fetched."""
        served = self.models.get(request.model)
        if served is None:
            card = MODELS[request.model]
            raise JobError(
                f"model: {request.model!r} is not served by this worker (started without "
                f"{card.weights_setting}): it serves {', '.join(repr(name) for name in self.models)}"
            )
        refusal = served.generator.refusals.get(mode_of(request).name) or acceleration.refusal(
            request.acceleration, served.generator.compiled
        )
        if refusal is not None:
            raise JobError(refusal)
        if request.control_preprocess == "depth" and self.depth is None:
            raise no_depth_model()
        if request.enable_prompt_expansion and self.expander is None:
            raise no_expander()
        if request.control_preprocess == "pose" and self.pose is None:
            raise no_pose_model()
        return served

    @staticmethod
    def _encode(images: list[Image.Image], request: GenerateRequest) -> list[bytes]:
        return [encode_image(image, request.output_format, request.output_quality) for image in images]

    def _deliver(
        self,
        job_id: str,
        data: list[bytes],
        request: GenerateRequest,
        inline: bool,
        stop: Stop,
        bucket: Bucket | None,
    ) -> list[str]:
        storage = self.storage if bucket is None or inline else self.storages.get(bucket)
        if storage is None or inline:
            return [data_uri(image, request.output_format) for image in data]
        return storage.upload_all(job_id, data, request.output_format, stop)
