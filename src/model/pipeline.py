"""Z-Image Turbo: load once, then every mode of src/model/modes.py on one set of weights.

The diffusers pipelines do the work; this module calls them in three timed stages
(prompt encoding, denoising to latents, VAE decode) so each stage is measured and the
decoded images stay on the device for the mode's last step and the safety checker.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline, ZImageControlNetModel, ZImagePipeline
from PIL import Image
from safetensors import SafetensorError

from src.inputs.pictures import Inputs
from src.model.acceleration import LEVELS, step_cache, steps_run
from src.model.control_window import control_window, controlled_steps
from src.model.files import ModelNotFound, load_failure
from src.model.modes import MODES, Mode, mode_of
from src.model.pixels import to_bytes
from src.model.placement import is_cast
from src.model.prompts import PromptEncoder
from src.model.seed_variance import with_seed_variance
from src.model.upscale import vae_tiles
from src.request.schema import PRESET_SIZES, GenerateRequest
from src.runtime.timing import Stopwatch

if TYPE_CHECKING:
    from src.lora.hotswap import HotswapSlots

log = logging.getLogger(__name__)

# Fastest first; each needs its package and a GPU that runs it (flash-attn 3 is Hopper-only).
ATTENTION_BACKENDS = ("_flash_3", "flash", "_native_cudnn", "native")

StepCallback = Callable[[int, int], None]


def pick_device() -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA (the weights' native precision); fp32 on CPU, where bf16 is slow."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_pipeline(
    folder: Path, dtype: torch.dtype, shared: dict | None = None, setting: str = "ZIMAGE_MODEL"
) -> ZImagePipeline:
    """The text-to-image pipeline from a local folder: safetensors only, never pickle.

    `shared`: components already loaded (another model's text encoder, tokenizer, VAE) that this
    pipeline takes as they are instead of loading its own (src/model/family.py).
    A folder can hold every file and still not load (a truncated download, a config that is not
    JSON); that stops the worker at start with the cause, as a missing folder does.
    """
    try:
        return ZImagePipeline.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, local_files_only=True, **(shared or {})
        )
    except (OSError, ValueError, SafetensorError) as err:
        raise ModelNotFound(
            f"{setting}: the model folder {folder} is there but cannot be loaded "
            f"({load_failure(err)}). A file in it is truncated or corrupt: download or "
            "copy the weights again, or rebuild the image (docs/deploy.md)."
        ) from None


class ZImageGenerator:
    def __init__(
        self,
        text_to_image: ZImagePipeline,
        device: torch.device,
        controlnet: ZImageControlNetModel | None = None,
        prompts: PromptEncoder | None = None,
        parts: dict[str, Any] | None = None,
    ) -> None:
        """`prompts`: another model's encoder and cache, when both use the same text encoder.
        `parts`: what a mode's pipeline takes beyond the shared components (Mode.parts)."""
        self.device = device
        self.text_to_image = text_to_image
        self.controlnet = controlnet
        # Every other mode's pipeline is built from the same component objects: no second copy
        # of any weight, and no dtype change (`from_pipe` without an explicit dtype would cast
        # them to fp32). The control modes add the ControlNet, which the pipeline hands the
        # transformer's embedders and refiners (`from_transformer`): shared, not copied.
        self.pipelines: dict[str, DiffusionPipeline] = {}
        # Why a mode has no pipeline on this worker, as the job's error (names control_image).
        self.refusals: dict[str, str] = {}
        for mode in MODES.values():
            if not mode.control:
                own = {argument: parts[part] for argument, part in mode.parts if part in (parts or {})}
                self.pipelines[mode.name] = (
                    text_to_image
                    if isinstance(text_to_image, mode.pipeline)
                    else mode.pipeline(**text_to_image.components, **own)
                )
            elif controlnet is None:
                self.refusals[mode.name] = (
                    "control_image: this worker has no ControlNet (started with CONTROLNET_MODEL=none): "
                    "leave 'control_image' out, or send the job to a worker with CONTROLNET_MODEL set"
                )
            else:
                try:
                    self.pipelines[mode.name] = mode.pipeline(
                        **text_to_image.components, controlnet=controlnet
                    )
                except ValueError:  # diffusers' refusal of a 1.0 ControlNet for inpainting
                    width = controlnet.config.control_in_dim
                    self.refusals[mode.name] = (
                        f"control_image: {mode.name} needs a 2.x ControlNet (it takes the mask and the "
                        f"masked image); this worker's is 1.0 (control_in_dim {width}): "
                        "leave 'image' and 'mask' out for text-to-image with control"
                    )
        for pipe in self.pipelines.values():
            pipe.set_progress_bar_config(disable=True)
        self.prompts = prompts or PromptEncoder(text_to_image, device)
        # Set by the memory plan at start (src/model/placement.py): the most images of a request
        # denoised and decoded at once, and the pixel count above which the VAE decodes in tiles.
        self.largest_batch: Callable[[GenerateRequest], int] = lambda request: request.num_images
        self.tile_above: int | None = None

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_to_image.text_encoder

    def accelerate(self, precision: str, compile_blocks: bool) -> None:
        """GPU-only speed-ups; each one that cannot be had is logged and skipped, never fatal."""
        if self.device.type != "cuda":
            if precision != "bf16" or compile_blocks:
                log.warning("ZIMAGE_PRECISION=fp8, ZIMAGE_COMPILE need a CUDA GPU; plain %s", self.device)
            return
        transformer = self.text_to_image.transformer
        backend = fastest_attention(transformer)
        # Every ControlNet the modes' pipelines hold (the Union, the Tile ControlNet), each once.
        held = (getattr(pipe, "controlnet", None) for pipe in self.pipelines.values())
        nets = {id(net): net for net in held if net is not None}.values()
        for net in nets:
            # The ControlNet's own blocks run attention and linears over the same tokens (2.1: about
            # half the transformer's size), so they get the same treatment. Without its own backend
            # it would follow diffusers' process-wide active one, whatever set it last.
            if backend is not None:
                net.set_attention_backend(backend)
            log.info("ControlNet attention backend: %s", backend or "diffusers' default")
        if precision == "fp8":
            _float8_matmuls(transformer, "transformer")
            for net in nets:
                # Its embedders and refiners are the transformer's (from_transformer): quantized once.
                _float8_matmuls(net, "ControlNet", skip=transformer)
        if compile_blocks:
            # Inductor's default cache lives in /tmp and dies with the container; on disk (a
            # network volume when there is one) a restarted worker skips the compile.
            volume = Path("/runpod-volume")
            home = Path.home() / ".cache"
            cache = (volume if volume.is_dir() else home) / "zimage-compile-cache"
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            transformer.compile_repeated_blocks(fullgraph=True, dynamic=True)
            log.info("regional torch.compile on %s blocks", transformer._repeated_blocks)

    @property
    def compiled(self) -> bool:
        """Whether the transformer's repeated blocks are compiled (ZIMAGE_COMPILE=1 on CUDA)."""
        return getattr(self.text_to_image.transformer.layers[0], "_compiled_call_impl", None) is not None

    def warm_up(self, compiled: bool = False, lora_slots: HotswapSlots | None = None) -> None:
        """Small jobs before the first real one, so lazy CUDA set-up is not billed to a caller.

        With torch.compile, every preset size is run once so the kernels for the sizes
        callers use are built (or read from the on-disk cache) before the first job. With the
        compiled worker's LoRA slots (src/lora/hotswap.py), each size runs once more with every
        slot active and all zero: the graph every LoRA job runs, compiled here rather than in
        the first one; the base weights are back on afterwards.
        """
        sizes = PRESET_SIZES if compiled else ("512*512",)
        # With a ControlNet, its pipeline too: the transformer then runs with hints added, another graph.
        control = "text-to-image with control" in self.pipelines
        for size in sizes:
            request = GenerateRequest(prompt="warm-up", size=size, num_inference_steps=2)
            self.generate(request, seed=0, clock=Stopwatch(self.device))
            if lora_slots is not None:
                with lora_slots.all_zero_active():
                    self.generate(request, seed=0, clock=Stopwatch(self.device))
            if control:
                request = request.model_copy(update={"control_image": "warm-up"})
                grey = Inputs(control=Image.new("RGB", (request.width, request.height), (128, 128, 128)))
                self.generate(request, seed=0, clock=Stopwatch(self.device), inputs=grey)

    def generate(
        self,
        request: GenerateRequest,
        seed: int,
        clock: Stopwatch,
        inputs: Inputs | None = None,
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Decoded images in [0, 1], shape (n, 3, H, W), still on the device.

        `inputs` holds the request's fitted pictures (input_image.load_inputs); the request's
        mode (modes.mode_of) picks the pipeline, what it adds to the call and its last step.
        """
        n = request.num_images
        mode = mode_of(request)
        pipe = self.pipelines[mode.name]
        inputs = inputs or Inputs()

        # 1. Encode the prompt, and the negative prompt only when guidance uses it ("" when
        #    none is given, as diffusers does).
        prompt_embeds = [self.prompts.embed(request.prompt)]
        use_cfg = request.guidance_scale > 0
        negative_embeds = [self.prompts.embed(request.negative_prompt or "")] if use_cfg else None
        clock.lap("encode_prompt")

        # 2-4. The images in as few batches as the memory plan allows (all at once unless it splits).
        batch = max(1, min(n, self.largest_batch(request)))
        starts = range(0, n, batch)
        parts = []
        for index, first in enumerate(starts):
            count = min(batch, n - first)

            def step_end(pipeline, step, timestep, tensors, index=index):
                if on_step is not None:
                    total = pipeline.num_timesteps
                    on_step(index * total + step + 1, len(starts) * total)
                return {}

            # One seed per image, seed + i (its generator, its seed variety): image i of a batch
            # is the image a single request with that seed makes, however the batch is split.
            seeds = [(seed + i) % 2**32 for i in range(first, first + count)]
            part = request.model_copy(update={"num_images": count})
            embeds = (prompt_embeds, negative_embeds)
            latents = self._denoise(pipe, mode, part, inputs, seeds, step_end, embeds)
            clock.lap(mode.stage)
            parts.append(self._decode(pipe, mode, request, inputs, latents))
            clock.lap("decode")
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _denoise(
        self,
        pipe: DiffusionPipeline,
        mode: Mode,
        request: GenerateRequest,
        inputs: Inputs,
        seeds: list[int],
        step_end: Callable,
        embeds: tuple[list[torch.Tensor], list[torch.Tensor] | None],
    ) -> torch.Tensor:
        """2. Denoise the request's images to latents; progress after every transformer step."""
        kwargs = dict(
            prompt_embeds=embeds[0],
            negative_prompt_embeds=embeds[1],
            height=request.height,
            width=request.width,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=[torch.Generator(self.device).manual_seed(value) for value in seeds],
            output_type="latent",
            callback_on_step_end=step_end,
        )
        # Seed variety: each image's own noisy prompt embeddings, until the step that drops them.
        kwargs = with_seed_variance(request.seed_variance, kwargs, seeds)
        # The request's acceleration level, on this pipeline call only (src/model/acceleration.py).
        extra = mode.arguments(inputs, request)
        schedule = LEVELS[request.model][request.acceleration]
        steps = steps_run(request.num_inference_steps, extra.get("strength"))
        # With control, the ControlNet runs on the steps of its window that the level computes.
        controlnet = getattr(pipe, "controlnet", None)
        runs = controlled_steps(steps, request.control_start, request.control_end, schedule)
        with step_cache(schedule, steps, pipe.transformer, controlnet is not None):
            with control_window(controlnet, runs):
                return pipe(**kwargs, **extra).images

    def _decode(
        self,
        pipe: DiffusionPipeline,
        mode: Mode,
        request: GenerateRequest,
        inputs: Inputs,
        latents: torch.Tensor,
    ) -> torch.Tensor:
        """3. Decode, denormalise to [0, 1]; the images stay on the device."""
        with torch.inference_mode():
            vae = pipe.vae
            # The plan's threshold, and a tiled mode's own (upscaling tiles its canvas past one tile).
            limits = [limit for limit in (self.tile_above, getattr(pipe, "tile_above", None)) if limit]
            latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            # Only for this decode: the next job's image-to-image encode must not tile.
            with vae_tiles(vae, any(request.width * request.height > limit for limit in limits)):
                decoded = vae.decode(latents, return_dict=False)[0]
            images = pipe.image_processor.postprocess(decoded, output_type="pt")
            # 4. The mode's last step (inpainting puts the kept pixels back); cheap beside the
            #    decode, so timed with it.
            if mode.finish is not None:
                images = mode.finish(images, inputs)
        return images


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(n, 3, H, W) in [0, 1] -> PIL images; the byte conversion runs on the device."""
    pixels = to_bytes(images).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def fastest_attention(module: torch.nn.Module) -> str | None:
    """The first of ATTENTION_BACKENDS that `module` takes, set on it; None when none is."""
    for backend in ATTENTION_BACKENDS:
        try:
            module.set_attention_backend(backend)
            log.info("attention backend: %s", backend)
            return backend
        except Exception as err:  # a missing package or an unsupported GPU
            log.info("attention backend %s unavailable (%s), trying the next", backend, err)
    return None


def not_shared_linears(owner: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """A torchao filter for the linear layers that are not also `owner`'s.

    The ControlNet holds the transformer's own embedder and refiner layers (from_transformer), and
    torchao's default filter does not skip an already-quantized layer in every version.
    """
    shared = {id(m) for m in owner.modules()}
    return lambda layer, name: isinstance(layer, torch.nn.Linear) and id(layer) not in shared


# The Docker image's torchao (locks/fp8-cuda.txt), apart from site-packages so that importing
# diffusers does not import it: on the path only once ZIMAGE_PRECISION=fp8 asks for it.
FP8_PACKAGES = Path("/opt/fp8")

# Linear layers already given float8 in this process: a layer that two modules hold (the base
# model's ControlNet view shares Turbo's ControlNet's control blocks) is quantized once.
_FLOAT8_DONE: set[int] = set()


def _float8_matmuls(module: torch.nn.Module, what: str, skip: torch.nn.Module | None = None) -> None:
    """ZIMAGE_PRECISION=fp8: torchao's dynamic float8 activations and weights for the linears.

    Needs torchao and a GPU with float8 tensor cores (Ada, Hopper or newer); without them
    the worker logs why and keeps bf16, so a setting never stops a working deployment.
    """
    wanted = (
        not_shared_linears(skip)
        if skip is not None
        else lambda layer, name: isinstance(layer, torch.nn.Linear)
    )

    def fresh(layer: torch.nn.Module, name: str) -> bool:
        # A layer the fp8 memory plan stores in float8 already (placement.py) keeps its casting.
        return wanted(layer, name) and id(layer) not in _FLOAT8_DONE and not is_cast(layer)

    chosen = [id(layer) for name, layer in module.named_modules() if fresh(layer, name)]
    if FP8_PACKAGES.is_dir() and str(FP8_PACKAGES) not in sys.path:
        sys.path.append(str(FP8_PACKAGES))
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        quantize_(module, config, filter_fn=fresh)
        _FLOAT8_DONE.update(chosen)
        log.info("fp8: float8 matmuls on the %s's linear layers", what)
    except Exception as err:  # torchao missing, or a GPU without float8
        log.warning("fp8 requested for the %s but unavailable (%s); keeping bf16", what, err)
