"""GPU memory: what each part and each job shape needs, and the plan that fits a budget.

Pure arithmetic on byte counts and config numbers, so the same code plans a 24 GB card for the
real weights and a few MB for the tiny test models (tests call it with plain numbers). The
weights are measured (src/model/placement.py sums the loaded tensors); working memory is
estimated from the configs, per stage, because the stages run one after another and only the
largest one sets the peak:

- encoding: the text encoder over a full-length prompt (and the expander's decoding);
- denoising: the transformer's widest activations (FFN and attention inputs) over every token
  of the batch, doubled by guidance, plus the ControlNet's hints kept for the whole step;
- decoding: the VAE decoder's full-resolution feature maps, per image decoded at once;
- upscaling: one tile's batch (and the Tile ControlNet's hints), one VAE tile's maps, and the
  canvas's latents and pixels at the largest output (UPSCALE_SIDE square).

The plans, in order; `auto` takes the first whose need fits (API.md, "GPU memory"). Loaded LoRA
slots are part of the plan: `auto` keeps the worst job's slots (LORA_MAX_LOADED) where they fit,
and fewer, never below MIN_LORA_SLOTS, where that lets an earlier plan fit, as vLLM sizes its
adapter slots to the memory left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from src.runtime.settings import MEMORY_PLANS as PLANS
from src.runtime.settings import SettingsError

GB = 2**30  # GPUs are sold in binary gigabytes (a "24 GB" RTX 4090 reports 23.99 GiB)
MAX_PROMPT_TOKENS = 512  # the prompt encoder truncates here (src/model/prompts.py)
EXPANSION_TOKENS = 1024  # the expander's longest conversation (src/model/expander.py STATIC_TOKENS)
TILE_PIXELS = 512  # the sliced VAE's tile side; it tiles only images over TILE_ABOVE pixels
TILE_ABOVE = 1024 * 1024
LORA_RANK = 64  # an assumption: the common rank of published Z-Image LoRAs
# Peak live values per token or pixel, in units of the width they multiply: the block's input,
# residual and attention q/k/v/out (6 x dim) beside the gated FFN's three intermediates (3 x ffn);
# the decoder's conv input, norm output and conv output over its two full-resolution widths.
TRANSFORMER_WIDTHS = (6, 3)
DECODER_WIDTHS = 3
TEXT_WIDTHS = 12  # x the text encoder's hidden size: its FFN (~4x) with attention and residuals
HEADROOM = 1.10  # allocator fragmentation and small buffers not modelled above
MIN_LORA_SLOTS = 3  # the adapters one request may use (request.schema.MAX_LORAS): never fewer loaded
UPSCALE_SIDE = 4096  # the largest upscale output (src/request/upscale.py)
LATENT_CHANNELS = 16
# The canvas's latents in fp32 (the latents, the blended prediction, the noise) and in the compute
# dtype (the encoded picture and the Tile ControlNet's input, 33 of 16 channels: about 2).
CANVAS_FP32, CANVAS_COMPUTE = 3, 3


@dataclass(frozen=True)
class Parts:
    """Bytes of each loaded part's weights; a tensor two parts share is counted once."""

    transformers: int  # every served model's transformer (LoRA adapters apart)
    text_encoder: int
    vae: int
    controlnet: int = 0  # its own weights (the embedders it borrows are the transformer's)
    tile_controlnet: int = 0  # TILE_CONTROLNET_MODEL's, the same way
    expander: int = 0  # the expander's own weights (those it shares are the text encoder's)
    others: int = 0  # safety checker, depth and pose models: small, always on the device
    # The transformers and ControlNet as the fp8 plan stores them (cast layers at 1 byte a value).
    fp8_transformers: int = 0
    fp8_controlnet: int = 0
    fp8_tile_controlnet: int = 0
    largest_cast_layer: int = 0  # bytes of the largest layer fp8 casts back for its compute

    @property
    def total(self) -> int:
        text = self.text_encoder + self.expander
        return self.transformers + self.controlnet + self.tile_controlnet + text + self.vae + self.others


@dataclass(frozen=True)
class Shapes:
    """The config numbers working memory scales with (src/model/placement.py reads them)."""

    dim: int  # transformer hidden size
    ffn_dim: int  # its feed-forward width
    patch: int  # pixels of latent per token side
    vae_scale: int  # pixels per latent
    decoder_widths: tuple[int, int]  # the VAE decoder's two widths at full resolution
    text_hidden: int  # the text encoder's hidden size
    text_layers: int
    value_bytes: int  # 2 in bf16, 4 in fp32
    control_hints: int = 0  # hints the ControlNet adds (its layer places), kept for the step
    lora_bytes: int = 0  # one adapter at LORA_RANK over the transformer's linear layers
    tile_hints: int = 0  # the same for the Tile ControlNet
    vae_tile: int = 1024  # the VAE's own tile side (its config's sample_size) where no plan slices it


@dataclass(frozen=True)
class Job:
    """A job shape: the largest the contract accepts unless a test asks for another."""

    width: int = 2048
    height: int = 2048
    images: int = 4
    guidance: bool = True  # any model takes guidance_scale > 0: two rows per image
    control: bool = True  # only where a ControlNet is loaded
    loras: int = 3  # adapters active; loaded ones stay (LORA_MAX_LOADED)
    expansion: bool = True  # only where an expander is loaded
    upscale: bool = True  # a 4096x4096 upscale (every worker takes them)
    tile: int = 1024  # UPSCALE_TILE: the side of the tiles it denoises


@dataclass(frozen=True)
class Plan:
    name: str
    splits: bool  # the batch is split where its working memory would not fit
    slices: bool  # the VAE decodes one image at a time, in tiles above TILE_ABOVE pixels
    offloads: bool  # the text encoder and the expander's own weights live in CPU memory
    fp8: bool  # the transformer and ControlNet are stored in fp8


TABLE = {
    "resident": Plan("resident", splits=False, slices=False, offloads=False, fp8=False),
    "sliced": Plan("sliced", splits=True, slices=True, offloads=False, fp8=False),
    "offload": Plan("offload", splits=True, slices=True, offloads=True, fp8=False),
    "fp8": Plan("fp8", splits=True, slices=True, offloads=True, fp8=True),
}


def tokens(shapes: Shapes, width: int, height: int) -> int:
    side = shapes.vae_scale * shapes.patch
    return math.ceil(width / side) * math.ceil(height / side) + MAX_PROMPT_TOKENS


def denoise_bytes(shapes: Shapes, job: Job, batch: int) -> int:
    """The transformer's (and ControlNet's) live activations for `batch` images at once."""
    rows = batch * (2 if job.guidance else 1)
    per_token = TRANSFORMER_WIDTHS[0] * shapes.dim + TRANSFORMER_WIDTHS[1] * shapes.ffn_dim
    if job.control:
        per_token += shapes.control_hints * shapes.dim
    return rows * tokens(shapes, job.width, job.height) * per_token * shapes.value_bytes


def decode_bytes(shapes: Shapes, job: Job, plan: Plan) -> int:
    """The VAE decoder's feature maps for the images it decodes at once, and the decoded batch."""
    width, height, images = job.width, job.height, job.images
    if plan.slices:
        images = 1
        if width * height > TILE_ABOVE:
            width, height = min(width, TILE_PIXELS), min(height, TILE_PIXELS)
    maps = images * width * height * DECODER_WIDTHS * sum(shapes.decoder_widths) * shapes.value_bytes
    decoded = job.images * 3 * job.width * job.height * 4 * 2  # fp32 [0, 1] images and their bytes
    return maps + decoded


def encode_bytes(shapes: Shapes, job: Job) -> int:
    """The text encoder over a full prompt; the expander's longer conversation and its KV cache."""
    count = EXPANSION_TOKENS if job.expansion else MAX_PROMPT_TOKENS
    cache = 2 * shapes.text_layers * count * shapes.text_hidden if job.expansion else 0
    return (count * TEXT_WIDTHS * shapes.text_hidden + cache) * shapes.value_bytes


def upscale_bytes(shapes: Shapes, job: Job, plan: Plan, tile_control: bool) -> int:
    """An upscale's peak: the canvas's latents and pixels, beside the larger of one tile's denoise
    (with the Tile ControlNet's hints) and one VAE tile's maps (the canvas is encoded and decoded
    in tiles)."""
    if not job.upscale:
        return 0
    tile = replace(job, width=job.tile, height=job.tile, images=1, control=False)
    denoise = denoise_bytes(shapes, tile, 1)
    if tile_control:
        hints = (2 if job.guidance else 1) * tokens(shapes, job.tile, job.tile) * shapes.tile_hints
        denoise += hints * shapes.dim * shapes.value_bytes
    side = TILE_PIXELS if plan.slices else max(TILE_PIXELS, shapes.vae_tile)
    vae = side * side * DECODER_WIDTHS * sum(shapes.decoder_widths) * shapes.value_bytes
    latents = (UPSCALE_SIDE // shapes.vae_scale) ** 2 * LATENT_CHANNELS
    canvas = latents * (CANVAS_FP32 * 4 + CANVAS_COMPUTE * shapes.value_bytes)
    # The resample in and the result out: fp32 [0, 1] pixels and their bytes, as decode_bytes counts.
    pixels = 3 * UPSCALE_SIDE * UPSCALE_SIDE * 4 * 2
    return canvas + pixels + max(denoise, vae)


def job_for(parts: Parts, job: Job) -> Job:
    """The job as this set of models can run it: no control without a ControlNet, and so on."""
    control, expansion = job.control and parts.controlnet > 0, job.expansion and parts.expander > 0
    return replace(job, control=control, expansion=expansion)


def need(plan: Plan, parts: Parts, shapes: Shapes, job: Job = Job(), batch: int | None = None) -> int:
    """Peak bytes of `job` under `plan`: the largest stage over the weights on the device then.

    `batch`: images denoised at once (the whole job unless the plan splits; then 1 by default,
    the least a split can go to).
    """
    job = job_for(parts, job)
    if batch is None:
        batch = 1 if plan.splits else job.images
    transformers = parts.fp8_transformers if plan.fp8 else parts.transformers
    controlnet = parts.fp8_controlnet if plan.fp8 else parts.controlnet
    controlnet += parts.fp8_tile_controlnet if plan.fp8 else parts.tile_controlnet
    loras = job.loras * shapes.lora_bytes
    device = transformers + controlnet + parts.vae + parts.others + loras
    if plan.fp8:
        device += parts.largest_cast_layer  # one layer at a time in its compute dtype
    text = parts.text_encoder + parts.expander
    if not plan.offloads:
        device += text
    denoise = denoise_bytes(shapes, job, batch)
    decode = decode_bytes(shapes, job, plan)
    # Offloaded, the text encoder is on the device only while it encodes.
    encode = encode_bytes(shapes, job) + (text if plan.offloads else 0)
    upscale = upscale_bytes(shapes, job, plan, parts.tile_controlnet > 0)
    return int(HEADROOM * (device + max(denoise, decode, encode, upscale)))


def largest_batch(plan: Plan, parts: Parts, shapes: Shapes, job: Job, budget: float) -> int:
    """How many of `job`'s images a plan denoises at once within `budget`: all of them unless it
    splits; else the most that fit, and at least one (the plan was chosen for that one)."""
    if not plan.splits or budget == math.inf:
        return job.images
    fits = [k for k in range(1, job.images + 1) if need(plan, parts, shapes, job, batch=k) <= budget]
    return max(fits, default=1)


class MemoryRefusal(SettingsError):
    """No plan fits GPU_MEMORY_GB: the worker does not start (handler.py stops on SettingsError)."""


@dataclass(frozen=True)
class Choice:
    plan: Plan
    need: int  # bytes, for the worst job
    fits: bool
    lora_slots: int = MIN_LORA_SLOTS  # adapters kept loaded between jobs


def _slots(plan: Plan, parts: Parts, shapes: Shapes, available: float, job: Job) -> Choice:
    """`plan` with the most LoRA slots that fit, from the worst job's down to MIN_LORA_SLOTS;
    the worst job's slots, not fitting, when none does."""
    for slots in range(job.loras, min(job.loras, MIN_LORA_SLOTS) - 1, -1):
        needed = need(plan, parts, shapes, replace(job, loras=slots))
        if needed <= available:
            return Choice(plan, needed, True, slots)
    return Choice(plan, need(plan, parts, shapes, job), False, job.loras)


def choose(
    wanted: str, parts: Parts, shapes: Shapes, budget: float, context: int = 0, job: Job = Job()
) -> Choice:
    """The plan for `budget` bytes (math.inf: no budget) of which `context` (the CUDA context)
    is taken already: `wanted` by name, or with "auto" the first in PLANS that fits `job`."""
    available = budget - context
    if wanted != "auto":
        return _slots(TABLE[wanted], parts, shapes, available, job)
    for name in PLANS:
        choice = _slots(TABLE[name], parts, shapes, available, job)
        if choice.fits:
            return choice
    fewest = replace(job, loras=min(job.loras, MIN_LORA_SLOTS))
    smallest = (need(TABLE["fp8"], parts, shapes, fewest) + context) / GB
    raise MemoryRefusal(
        f"GPU_MEMORY_GB: {budget / GB:.3g} GB is below the {smallest:.3g} GB that the smallest plan "
        f"(fp8, {MIN_LORA_SLOTS} LoRA slots) needs for these models and the largest accepted job: use a "
        "card with more memory, or load fewer models (ZIMAGE_BASE_MODEL=none, CONTROLNET_MODEL=none, "
        "TILE_CONTROLNET_MODEL=none, PROMPT_EXPANDER_MODEL=none)"
    )
