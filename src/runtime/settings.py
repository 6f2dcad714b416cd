"""Deployment settings, read from the environment in this one place.

`Settings.from_env(env)` takes the environment as a plain mapping so tests pass a dict.
A bad value raises `SettingsError` naming the variable; the worker stops at start.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# Each job in flight holds its input and output images in host memory; past a handful the
# GPU gains nothing (it runs one job at a time) and a job waits longer behind the others.
MAX_CONCURRENCY = 8
PRECISIONS = ("bf16", "fp8")
# The memory plans, least memory-saving first (src/model/memory.py); MEMORY_PLAN takes one or "auto".
MEMORY_PLANS = ("resident", "sliced", "offload", "fp8")
ENDPOINT_TYPES = ("queue", "lb")
UPSCALE_TILES = (512, 2048, 16)  # UPSCALE_TILE's bounds and step
UPSCALE_PROMPT = (
    "a high-resolution photograph with sharp, natural fine detail and clean textures, "
    "faithful to the original picture"
)

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting has a value the worker cannot run with."""


@dataclass(frozen=True)
class Settings:
    # Z-Image-Turbo (`model: "z-image-turbo"`): a local diffusers folder, or a Hugging Face repo
    # id looked up in the local caches; "none" with base_model set makes a base-only worker.
    model: str = "Tongyi-MAI/Z-Image-Turbo"
    # The undistilled base (`model: "z-image"`, e.g. Tongyi-MAI/Z-Image), found like `model`; it
    # shares Turbo's text encoder and VAE when they are the same weights. "none": Turbo only.
    base_model: str = "none"
    # A transformers image classifier with an `nsfw` label, or "none" to turn checking off.
    safety_checker_model: str = "Falconsai/nsfw_image_detection"
    # An image is flagged when P(nsfw) >= this.
    safety_threshold: float = 0.5
    # S3-compatible storage; all three set means images are uploaded.
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = None
    bucket_secret_access_key: str | None = None
    # The bucket that receives uploads.
    bucket_name: str = "zimage-outputs"
    # SigV4 region; empty: taken from an AWS/B2 endpoint host, "auto" for R2 and GCS, else us-east-1.
    bucket_region: str | None = None
    # "auto" (virtual-hosted on amazonaws.com, path-style elsewhere), "path" or "virtual".
    bucket_addressing_style: str = "auto"
    # What one returned image costs; `cost` = this x images returned.
    price_per_image_usd: float = 0.005
    # The same for a base-model image.
    base_price_per_image_usd: float = 0.01
    # Runpod sets RUNPOD_WEBHOOK_POST_OUTPUT on its workers: only there do progress updates go out.
    report_progress: bool = False
    # Regional torch.compile of the repeated transformer block, warmed up at start (CUDA only).
    compile: bool = False
    # ZIMAGE_PRECISION: "fp8" turns on float8 matmuls on GPUs that have them; "bf16" keeps bf16.
    precision: str = "bf16"
    # "1"/"true": a repo id missing from every local place is downloaded at start (needs HF_HUB_OFFLINE=0).
    allow_download: bool = False
    # Z-Image-Turbo Fun ControlNet Union: a diffusers folder, a folder or file holding alibaba-pai's
    # single .safetensors release, or a repo id in the local caches; "none" turns control off.
    controlnet_model: str = "none"
    # The transformers depth-estimation model for control_preprocess "depth", loaded only with a
    # ControlNet; "none" turns that preprocessor off.
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    # A Qwen3 causal LM (folder or repo id, found like `model`) for enable_prompt_expansion; its
    # tensors identical to the text encoder's are shared, not loaded twice. "none": expansion off.
    prompt_expander_model: str = "none"
    # Added to `cost` once per request whose prompt was expanded.
    prompt_expansion_price_usd: float = 0.0025
    # The ViTPose (transformers VitPoseForPoseEstimation) for control_preprocess "pose", loaded only
    # with a ControlNet, found like DEPTH_MODEL; "none" turns that preprocessor off (the Docker
    # image bakes usyd-community/vitpose-base-simple and sets it).
    pose_model: str = "none"
    # The person detector beside it (transformers RTDetrForObjectDetection with a `person` label),
    # found the same way; read only when POSE_MODEL is set.
    pose_detector_model: str = "PekingU/rtdetr_r50vd_coco_o365"
    # The largest tile side, in pixels, that upscaling refines at once (a multiple of 16 in
    # 512..2048): Turbo's own sizes; past 1024 fewer tiles, but attention grows with the tile's square.
    upscale_tile: int = 1024
    # The prompt an upscale without one refines with: neutral, so the tiles add detail, not content.
    upscale_prompt: str = UPSCALE_PROMPT
    # The price of an upscaled image per 1024x1024 pixels of output (a 2048x2048 output is 4 of them).
    upscale_price_per_mp_usd: float = 0.005
    # alibaba-pai's Z-Image-Turbo Fun ControlNet Tile 2.1, found like `controlnet_model`, for
    # upscaling (each tile conditioned on its own resampled pixels); "none" turns it off.
    tile_controlnet_model: str = "none"
    # Jobs in flight on one worker (Runpod's concurrency_modifier); the GPU still runs one at a
    # time, and the others fetch inputs, encode and upload meanwhile. 1 = strictly one job.
    max_concurrency: int = 2
    # Folders searched, in order, for LoRAs a request names by bare file name (`name.safetensors`).
    lora_dirs: tuple[str, ...] = ("/runpod-volume/loras", "/loras")
    # Where downloaded LoRAs are kept; unset: on the network volume when one is mounted (shared by
    # every worker on it), else in the home cache. See `lora_cache_path`.
    lora_cache_dir: str | None = None
    # Disk budget of that cache in GB; past it the least recently used files are deleted.
    lora_cache_gb: float = 20.0
    # The largest LoRA file a URL may deliver, in MiB (rank-128 LoRAs of 6B models are ~1 GB).
    lora_max_mb: int = 1024
    # Adapters kept loaded in the transformer between jobs; the least recently used are unloaded.
    lora_max_loaded: int = 6
    # GPU_MEMORY_GB: the memory the worker plans for, in GB (2^30 bytes); None: the GPU's total
    # memory, or no limit without CUDA (src/model/memory.py).
    gpu_memory_gb: float | None = None
    # MEMORY_PLAN: "auto" (the first plan that fits) or one of MEMORY_PLANS, forced.
    memory_plan: str = "auto"
    # "queue": Runpod's job queue (the SDK's job loop); "lb": a load-balancing endpoint, where the
    # worker is the HTTP server (src/lb/).
    endpoint_type: str = "queue"
    # With "lb": the server's port, and the port of its /ping (from_env: PORT unless set).
    port: int = 80
    port_health: int = 80
    # With "lb": the bearer key every route but /ping requires; None: none (Runpod's gateway checks).
    worker_api_key: str | None = None

    @property
    def lora_cache_path(self) -> Path:
        if self.lora_cache_dir is not None:
            return Path(self.lora_cache_dir)
        volume = Path("/runpod-volume")
        return volume / "lora-cache" if volume.is_dir() else Path.home() / ".cache" / "zimage-loras"

    @property
    def storage_enabled(self) -> bool:
        return self.bucket_endpoint_url is not None

    @property
    def safety_enabled(self) -> bool:
        return self.safety_checker_model.lower() != "none"

    @property
    def control_enabled(self) -> bool:
        return self.controlnet_model.lower() != "none"

    @property
    def tile_control_enabled(self) -> bool:
        return self.tile_controlnet_model.lower() != "none"

    @property
    def expansion_enabled(self) -> bool:
        return self.prompt_expander_model.lower() != "none"

    @property
    def depth_enabled(self) -> bool:
        return self.control_enabled and self.depth_model.lower() != "none"

    @property
    def pose_enabled(self) -> bool:
        return self.control_enabled and self.pose_model.lower() != "none"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def text(name: str, default: str | None) -> str | None:
            value = env.get(name, "").strip()
            return value or default

        bucket = {
            name: text(name, None)
            for name in ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")
        }
        missing = [name for name, value in bucket.items() if value is None]
        if 0 < len(missing) < len(bucket):
            raise SettingsError(
                f"{', '.join(missing)} not set: storage needs all of BUCKET_ENDPOINT_URL, "
                "BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY (or none of them, to return data URIs)"
            )
        endpoint = bucket["BUCKET_ENDPOINT_URL"]
        if endpoint is not None:
            parsed = urlparse(endpoint)
            # Credentials in the URL would end up in botocore's connection-error messages.
            if parsed.scheme not in ("http", "https") or not parsed.hostname or "@" in parsed.netloc:
                raise SettingsError(
                    f"BUCKET_ENDPOINT_URL: {endpoint.split('@')[-1]!r} is not an http(s) URL "
                    "without credentials in it "
                    "(e.g. https://<account>.r2.cloudflarestorage.com or https://s3.us-east-1.amazonaws.com)"
                )

        bucket_name = text("BUCKET_NAME", cls.bucket_name)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]", bucket_name):
            raise SettingsError(
                f"BUCKET_NAME: {bucket_name!r} is not a bucket name: use 3 to 63 lowercase letters, "
                "digits, dots and hyphens, starting and ending with a letter or digit"
            )

        addressing = text("BUCKET_ADDRESSING_STYLE", cls.bucket_addressing_style).lower()
        if addressing not in ("auto", "path", "virtual"):
            raise SettingsError(
                f"BUCKET_ADDRESSING_STYLE: {addressing!r} is not allowed: use 'auto', 'path' or 'virtual'"
            )

        lora_dirs = tuple(part.strip() for part in text("LORA_DIRS", "").split(":") if part.strip())
        if any(not Path(folder).is_absolute() for folder in lora_dirs):
            raise SettingsError(
                f"LORA_DIRS: {env.get('LORA_DIRS', '')!r} is not allowed: use absolute folders "
                "separated by ':' (e.g. /runpod-volume/loras:/loras)"
            )
        lora_cache_dir = text("LORA_CACHE_DIR", None)
        if lora_cache_dir is not None and not Path(lora_cache_dir).is_absolute():
            raise SettingsError(f"LORA_CACHE_DIR: {lora_cache_dir!r} is not allowed: use an absolute folder")

        model, base_model = text("ZIMAGE_MODEL", cls.model), text("ZIMAGE_BASE_MODEL", cls.base_model)
        if model.lower() == "none" and base_model.lower() == "none":
            raise SettingsError(
                "ZIMAGE_MODEL and ZIMAGE_BASE_MODEL are both 'none': set at least one of them "
                "(Turbo: Tongyi-MAI/Z-Image-Turbo, the base: Tongyi-MAI/Z-Image)"
            )

        return cls(
            model=model,
            base_model=base_model,
            safety_checker_model=text("SAFETY_CHECKER_MODEL", cls.safety_checker_model),
            controlnet_model=text("CONTROLNET_MODEL", cls.controlnet_model),
            depth_model=text("DEPTH_MODEL", cls.depth_model),
            prompt_expander_model=text("PROMPT_EXPANDER_MODEL", cls.prompt_expander_model),
            prompt_expansion_price_usd=_number(
                env, "PROMPT_EXPANSION_PRICE_USD", cls.prompt_expansion_price_usd, 0.0, 1000.0
            ),
            pose_model=text("POSE_MODEL", cls.pose_model),
            upscale_tile=_upscale_tile(env),
            upscale_prompt=text("UPSCALE_PROMPT", cls.upscale_prompt),
            upscale_price_per_mp_usd=_number(
                env, "UPSCALE_PRICE_PER_MP_USD", cls.upscale_price_per_mp_usd, 0.0, 1000.0
            ),
            tile_controlnet_model=text("TILE_CONTROLNET_MODEL", cls.tile_controlnet_model),
            pose_detector_model=text("POSE_DETECTOR_MODEL", cls.pose_detector_model),
            safety_threshold=_number(env, "SAFETY_THRESHOLD", cls.safety_threshold, 0.0, 1.0),
            bucket_endpoint_url=endpoint,
            bucket_access_key_id=bucket["BUCKET_ACCESS_KEY_ID"],
            bucket_secret_access_key=bucket["BUCKET_SECRET_ACCESS_KEY"],
            bucket_name=bucket_name,
            bucket_region=text("BUCKET_REGION", None),
            bucket_addressing_style=addressing,
            price_per_image_usd=_number(env, "PRICE_PER_IMAGE_USD", cls.price_per_image_usd, 0.0, 1000.0),
            base_price_per_image_usd=_number(
                env, "BASE_PRICE_PER_IMAGE_USD", cls.base_price_per_image_usd, 0.0, 1000.0
            ),
            precision=_precision(env),
            report_progress=bool(text("RUNPOD_WEBHOOK_POST_OUTPUT", None)),
            allow_download=_flag(env, "ZIMAGE_ALLOW_DOWNLOAD", cls.allow_download),
            compile=_flag(env, "ZIMAGE_COMPILE", cls.compile),
            max_concurrency=_integer(env, "MAX_CONCURRENCY", cls.max_concurrency, 1, MAX_CONCURRENCY),
            lora_dirs=lora_dirs or cls.lora_dirs,
            lora_cache_dir=lora_cache_dir,
            lora_cache_gb=_number(env, "LORA_CACHE_GB", cls.lora_cache_gb, 0.0, 100_000.0),
            lora_max_mb=_integer(env, "LORA_MAX_MB", cls.lora_max_mb, 1, 8192),
            lora_max_loaded=_integer(env, "LORA_MAX_LOADED", cls.lora_max_loaded, 1, 64),
            # Unset reads as 0, which no set value can be: None, the GPU's own memory.
            gpu_memory_gb=_number(env, "GPU_MEMORY_GB", 0.0, 0.001, 100_000.0) or None,
            memory_plan=_choice(env, "MEMORY_PLAN", cls.memory_plan, ("auto", *MEMORY_PLANS)),
            endpoint_type=_choice(env, "ENDPOINT_TYPE", cls.endpoint_type, ENDPOINT_TYPES),
            port=(port := _integer(env, "PORT", cls.port, 1, 65535)),
            port_health=_integer(env, "PORT_HEALTH", port, 1, 65535),
            worker_api_key=text("WORKER_API_KEY", None),
        )


def _upscale_tile(env: Mapping[str, str]) -> int:
    low, high, step = UPSCALE_TILES
    tile = _integer(env, "UPSCALE_TILE", Settings.upscale_tile, low, high)
    if tile % step:
        raise SettingsError(
            f"UPSCALE_TILE: {tile} is not allowed: it must be a multiple of {step} from {low} to {high}"
        )
    return tile


def _precision(env: Mapping[str, str]) -> str:
    """ZIMAGE_PRECISION, or the older ZIMAGE_ACCELERATION (none/fp8), which now names the per-request
    step caches (`acceleration`); it still works, with a warning. The new name wins when both are set."""
    value = env.get("ZIMAGE_PRECISION", "").strip().lower()
    if value:
        if value not in PRECISIONS:
            raise SettingsError(f"ZIMAGE_PRECISION: {value!r} is not allowed: use 'bf16' or 'fp8'")
        return value
    old = env.get("ZIMAGE_ACCELERATION", "").strip().lower()
    if not old:
        return Settings.precision
    if old not in ("none", "fp8"):
        raise SettingsError(
            f"ZIMAGE_ACCELERATION: {old!r} is not allowed: use ZIMAGE_PRECISION=bf16 or ZIMAGE_PRECISION=fp8"
        )
    precision = "bf16" if old == "none" else "fp8"
    log.warning(
        "ZIMAGE_ACCELERATION is the old name of ZIMAGE_PRECISION: set ZIMAGE_PRECISION=%s instead "
        "(per-request speed levels are the job's `acceleration` field)",
        precision,
    )
    return precision


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = env.get(name, "").strip().lower() or default
    if value not in allowed:
        raise SettingsError(
            f"{name}: {value[:40]!r} is not allowed: use {' or '.join(repr(a) for a in allowed)}"
        )
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.lower() in ("1", "true"):
        return True
    if raw.lower() in ("0", "false"):
        return False
    raise SettingsError(f"{name}: {raw!r} is not allowed: use 1 or true for on, 0, false or unset for off")


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]{1,5}", raw, flags=re.ASCII) or not low <= int(raw) <= high:
        raise SettingsError(f"{name}: {raw!r} is not allowed: it must be a whole number from {low} to {high}")
    return int(raw)


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise SettingsError(f"{name}: {raw!r} is not allowed: it must be a number from {low:g} to {high:g}")
    return value
