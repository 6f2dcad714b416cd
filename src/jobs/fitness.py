"""The start: every reason this worker cannot serve, found first, and reported as Runpod expects.

Runpod's SDK (>= 1.9) runs the checks registered with `register_fitness_check` when a worker
starts on the platform, before its first job. A check that raises is reported to the platform
as an unhealthy worker (a GET to the heartbeat URL with `status=unhealthy`, the check's name
and its reason: runpod/serverless/modules/rp_fitness.py) and the process exits, so Runpod
replaces the machine instead of restarting, again and again, a worker that can never serve.

`Start` holds a start's parts in order, each named as its report names it: `settings`,
`model_files`, `gpu`, `disk` (cheap: no weight is read), then `weights` (the load). On the
platform each is a fitness check, the load last, after the SDK's own checks (its GPU test and
the driver's CUDA version against RUNPOD_MIN_CUDA_VERSION), so a machine that cannot serve is
reported within seconds. Locally (`--test_input`, `--rp_serve_api`) and on a load-balancing
endpoint, which have no fitness phase, `run` and `load` call the same parts in the same order.
"""

from __future__ import annotations

import functools
import gc
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from runpod.serverless.modules import rp_fitness

from src.control.controlnet import find_controlnet
from src.jobs.worker import Worker
from src.model.expander_weights import missing_expander_files
from src.model.files import (
    ModelNotFound,
    SearchRoots,
    load_failure,
    missing_classifier_files,
    missing_pipeline_files,
    resolve_model,
)
from src.model.pipeline import pick_device
from src.model.safety import SafetyModelError
from src.request.models import MODELS
from src.runtime.gpu import GpuStage
from src.runtime.logs import add_secret
from src.runtime.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MATMUL_SIDE = 256  # the GPU's test product: a few microseconds on any card
MATMUL_TOLERANCE = 0.02  # of the largest entry; bf16 rounding of the inputs gives ~0.002


class Unfit(RuntimeError):
    """This machine cannot serve: its GPU computes wrongly, or its disk cannot hold the LoRA cache."""


# The failures that are the deployment's (a setting, missing files, the machine): logged
# without a traceback. Anything else is a bug and keeps its traceback.
EXPECTED = (SettingsError, ModelNotFound, SafetyModelError, Unfit)


class Handler(Protocol):
    async def handle(self, job: dict[str, Any]) -> dict[str, Any]: ...


class Start:
    """One process's start, part by part; `worker` is set once the weights are in."""

    def __init__(
        self,
        env: Mapping[str, str],
        handler_of: Callable[[Worker], Handler],
        started: float,
        roots: SearchRoots | None = None,
    ) -> None:
        # `handler_of`: the SDK's handler over the loaded worker (the OpenAI adapter, a layer above).
        # `started`: the process's start on time.perf_counter, for the cold start's log line.
        self.handler_of, self.started, self.roots = handler_of, started, roots
        self.stage = GpuStage()  # the GPU thread: the GPU's test and the load run there
        self.worker: Worker | None = None
        self.handler: Handler | None = None
        self.config: Settings | None = None
        self.unfit: SettingsError | None = None
        try:  # read now, for the endpoint type; a bad value fails the `settings` part
            self.config = Settings.from_env(env)
        except SettingsError as err:
            self.unfit = err
        else:
            for secret in (self.config.bucket_access_key_id, self.config.bucket_secret_access_key):
                add_secret(secret)
            add_secret(self.config.worker_api_key)

    # ---------------------------------------------------------------- the parts, in order
    def settings(self) -> None:
        """Every setting has a value the worker can run with (Settings.from_env)."""
        if self.unfit is not None:
            raise self.unfit

    def model_files(self) -> None:
        """Every model the settings name is a complete folder somewhere it is looked for."""
        settings = self._settings()
        roots = self._roots()
        folders = model_folders(settings)
        # The ControlNets before the preprocessors that serve them: depth and pose load only
        # with a ControlNet, so a missing ControlNet is the cause to name.
        for setting, missing, name in (f for f in folders if f[2] not in PREPROCESSORS):
            resolve_model(setting, missing, name, roots)
        controlnets = (
            (settings.control_enabled, settings.controlnet_model, "CONTROLNET_MODEL"),
            (settings.tile_control_enabled, settings.tile_controlnet_model, "TILE_CONTROLNET_MODEL"),
        )
        for setting, name in ((setting, name) for on, setting, name in controlnets if on):
            find_controlnet(setting, roots, name)
        for setting, missing, name in (f for f in folders if f[2] in PREPROCESSORS):
            resolve_model(setting, missing, name, roots)

    def gpu(self) -> None:
        """The device computes a small product right in the compute dtype (on the GPU thread)."""
        self.stage.call(device_computes)

    def disk(self) -> None:
        """The LoRA cache's folder can be made and can hold at least one LoRA."""
        lora_cache_fits(self._settings())

    def weights(self) -> None:
        """Load everything (src/jobs/worker.py), on the GPU thread the checks used."""
        self.worker = Worker.start(self._settings(), self.roots, gpu=self.stage)
        self.handler = self.handler_of(self.worker)
        gc.freeze()  # the model's objects live as long as the process: no collection walks them
        ms = (time.perf_counter() - self.started) * 1000
        log.info("cold start: %.0f ms from process start to taking jobs", ms)

    def checks(self) -> list[Callable[[], None]]:
        """The parts that read no weight, in order."""
        return [self.settings, self.model_files, self.gpu, self.disk]

    # --------------------------------------------------------------------- running them
    def register(self) -> None:
        """On the platform: each part a fitness check, run by the SDK before its first job."""
        for check in self.checks():
            rp_fitness.register_fitness_check(logged(check))
        # The SDK adds its own checks when its fitness phase begins, after every one registered by
        # then; added here, they run before the weights are read (tests/test_fitness.py guards it).
        rp_fitness._ensure_gpu_check_registered()
        rp_fitness._ensure_system_checks_registered()
        rp_fitness.register_fitness_check(logged(self.weights))

    def run(self) -> bool:
        """Without a fitness phase: every part here, in order; False (logged) at the first failure."""
        for part in [*self.checks(), self.weights]:
            try:
                part()
            except EXPECTED as err:
                log.error("cannot start: %s", err)
                return False
        return True

    def load(self) -> Worker:
        """A load-balancing worker's load (its server is already listening): raises what fails."""
        for part in [*self.checks(), self.weights]:
            part()
        return self.loaded()

    # ---------------------------------------------------------------- once loaded
    def loaded(self) -> Worker:
        if self.worker is None:
            raise RuntimeError("the worker is not loaded yet")
        return self.worker

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """The SDK's handler: jobs are taken only after the last fitness check loaded the worker."""
        if self.handler is None:
            raise RuntimeError("a job arrived before the worker was loaded")
        return await self.handler.handle(job)

    def _settings(self) -> Settings:
        if self.config is None:  # a part after `settings`, which failed
            raise self.unfit or SettingsError("the settings were not read")
        return self.config

    def _roots(self) -> SearchRoots:
        return self.roots or SearchRoots(allow_download=self._settings().allow_download)


def logged(part: Callable[[], None]) -> Callable[[], None]:
    """A part as a fitness check: its failure also logged as a failed start always was (the SDK
    logs the reason, and a traceback only at DEBUG), under the part's own name for the report."""

    @functools.wraps(part)
    def check() -> None:
        try:
            part()
        except EXPECTED as err:
            log.error("cannot start: %s", err)
            raise
        except Exception:
            log.exception("cannot start: unexpected error in %s", part.__name__)
            raise

    return check


# The models that preprocess a ControlNet's input, loaded only with one.
PREPROCESSORS = ("DEPTH_MODEL", "POSE_MODEL", "POSE_DETECTOR_MODEL")


def model_folders(settings: Settings) -> list[tuple[str, Callable[[Path], list[str]], str]]:
    """(setting, what a complete folder holds, variable) for every model folder the settings name."""
    folders = [
        (getattr(settings, card.settings_field), missing_pipeline_files, card.weights_setting)
        for card in MODELS.values()
        if getattr(settings, card.settings_field).lower() != "none"
    ]
    s, classifier = settings, missing_classifier_files
    optional = [  # (loaded at all, setting, what a complete folder holds, variable)
        (s.safety_enabled, s.safety_checker_model, classifier, "SAFETY_CHECKER_MODEL"),
        (s.expansion_enabled, s.prompt_expander_model, missing_expander_files, "PROMPT_EXPANDER_MODEL"),
        (s.depth_enabled, s.depth_model, classifier, "DEPTH_MODEL"),
        (s.pose_enabled, s.pose_model, classifier, "POSE_MODEL"),
        (s.pose_enabled, s.pose_detector_model, classifier, "POSE_DETECTOR_MODEL"),
    ]
    return folders + [(setting, missing, name) for on, setting, missing, name in optional if on]


def device_computes(side: int = MATMUL_SIDE) -> None:
    """A `side`-square product in the compute dtype on the device, against float64 on the CPU.

    A card whose memory or arithmetic is broken, or whose driver cannot run this torch's kernels,
    fails here in milliseconds, instead of failing (or corrupting) every job after a long load.
    """
    device, dtype = pick_device()
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator) for _ in range(2))
    expected = a.double() @ b.double()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    what = f"{where} ({device}) failed a {side}x{side} {str(dtype).removeprefix('torch.')} matrix product"
    try:
        got = (a.to(device, dtype) @ b.to(device, dtype)).double().cpu()
    except RuntimeError as err:
        raise Unfit(f"GPU: {what} ({load_failure(err)}): this machine cannot serve") from None
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    if not error <= MATMUL_TOLERANCE:  # NaN included
        raise Unfit(
            f"GPU: {what}: off by {error:.3g} of its largest entry (at most {MATMUL_TOLERANCE} is "
            "right): the card computes wrongly and this machine cannot serve"
        )


def lora_cache_fits(settings: Settings, usage: Callable[[Path], Any] = shutil.disk_usage) -> None:
    """The LoRA cache's folder exists (made here) and its disk can hold one LoRA of LORA_MAX_MB.

    Below LORA_CACHE_GB of room the worker still serves (the cache evicts sooner when a download
    finds the disk full); it says so. `usage`: shutil.disk_usage's shape (tests pass their own).
    """
    cache = settings.lora_cache_path
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise Unfit(
            f"LORA_CACHE_DIR: the LoRA cache's folder {cache} cannot be made ({type(err).__name__}): "
            "set LORA_CACHE_DIR to a writable folder, or mount the network volume at /runpod-volume"
        ) from None
    held = sum(path.stat().st_size for path in cache.glob("*.safetensors"))
    room = usage(cache).free + held
    one = settings.lora_max_mb * 2**20
    if room < one:
        raise Unfit(
            f"LORA_CACHE_DIR: {cache} has room for {room / 2**20:.0f} MiB of LoRAs, less than one "
            f"LoRA of LORA_MAX_MB ({settings.lora_max_mb} MiB): give the worker more disk (or a "
            "network volume), or set LORA_MAX_MB lower"
        )
    if room < settings.lora_cache_gb * 1e9:
        log.warning(
            "LORA_CACHE_DIR: %s has room for %.1f GB of LoRAs, less than LORA_CACHE_GB (%g): "
            "set LORA_CACHE_GB to at most that",
            cache,
            room / 1e9,
            settings.lora_cache_gb,
        )
