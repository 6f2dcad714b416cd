"""Upscaling's refine: image-to-image over the resampled canvas, denoised in blended tiles.

MultiDiffusion as diffusers' panorama pipeline does it: one scheduler over one canvas latent; at
every step each view (src/model/tiles.py) is predicted at its own size, and the predictions are
blended into one canvas prediction with weights that sum to 1, which the scheduler then steps.
The Euler flow-matching step is linear in the prediction, so blending the predictions is blending
the tiles' stepped latents, as the panorama pipeline does, with one step instead of many.

A canvas of one view is ZImageImg2ImgPipeline's own computation: the same encode, noise (from the
job's generator), timesteps and transformer call. Past one view the VAE encodes (here) and decodes
(src/model/pipeline.py, `tile_above`) the canvas in tiles, so 16 MP never passes through it whole.

With the Tile ControlNet (TILE_CONTROLNET_MODEL) each tile's prediction is also conditioned on its
own part of the resampled picture: the canvas's encoding (its mode, as diffusers' ControlNet
pipelines take it), cut to the view and padded with zeros to the ControlNet's input width, as
ZImageControlNetPipeline pads it for text-to-image.

Each tile step calls `callback_on_step_end` (so progress counts tile steps and a stop ends the job
at the next one), in its own step-cache context (src/model/acceleration.py keeps one history per
tile: each tile's forecast comes from that tile's own earlier steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import AutoencoderKL, ZImageControlNetModel, ZImageImg2ImgPipeline
from diffusers.models.cache_utils import CacheMixin
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from diffusers.pipelines.z_image.pipeline_z_image_img2img import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)
from diffusers.utils.torch_utils import randn_tensor

from src.model import tiles

DEFAULT_TILE = 1024  # UPSCALE_TILE's default (src/runtime/settings.py)
# The smallest VAE tile the canvas is encoded and decoded in: the sliced memory plan's (memory.py's
# TILE_PIXELS); a VAE whose config asks for less (the tiny test models: 64) would take hundreds.
VAE_TILE = 512


@contextmanager
def vae_tiles(vae: AutoencoderKL, on: bool) -> Iterator[None]:
    """diffusers' tiled encode and decode on `vae` for one call, or not; as it was afterwards."""
    before, vae.use_tiling = vae.use_tiling, on
    try:
        yield
    finally:
        vae.use_tiling = before


class UpscalePipeline(ZImageImg2ImgPipeline):
    """ZImageImg2ImgPipeline whose denoising runs over overlapping tiles of at most `tile` pixels."""

    def __init__(
        self,
        scheduler: Any,
        vae: AutoencoderKL,
        text_encoder: Any,
        tokenizer: Any,
        transformer: Any,
        controlnet: ZImageControlNetModel | None = None,
        tile: int = DEFAULT_TILE,
    ) -> None:
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)
        # It runs the transformer's own embedders and refiners, as in ZImageControlNetPipeline.
        if controlnet is not None:
            controlnet = ZImageControlNetModel.from_transformer(controlnet, transformer)
        # `controlnet`, the name the job flow's step cache and control window look for.
        self.register_modules(controlnet=controlnet)
        self.tile = tile
        # The decode tiles the canvas too past one tile's pixels (pipeline.py reads this).
        self.tile_above = tile * tile
        if vae.tile_sample_min_size < VAE_TILE:
            vae.tile_sample_min_size, vae.tile_latent_min_size = VAE_TILE, VAE_TILE // self.vae_scale_factor

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        image: Any,
        strength: float,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: list[torch.Generator],
        prompt_embeds: list[torch.Tensor],
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        num_images_per_prompt: int = 1,
        controlnet_conditioning_scale: float = 1.0,
        callback_on_step_end: Callable | None = None,
        output_type: str = "latent",
    ) -> ZImagePipelineOutput:
        """The refined canvas latent (one image: the request refuses more with `upscale`)."""
        if num_images_per_prompt != 1 or output_type != "latent":
            raise ValueError("UpscalePipeline makes one image and returns its latent (output_type='latent')")
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device, dtype = self._execution_device, prompt_embeds[0].dtype

        # 1. The views over the canvas latent and their blend weights, once for the whole job.
        scale = self.vae_scale_factor
        latent_height, latent_width = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
        patch = self.transformer.config.all_patch_size[0]
        views = tiles.views(latent_height, latent_width, self.tile // scale, patch)
        weights = [
            w.to(device) for w in tiles.weights(latent_height, latent_width, self.tile // scale, patch)
        ]

        # 2. Encode the resampled canvas (in tiles past one tile's pixels, as the decode): the latents
        #    the noise is added to, sampled with the job's generator as diffusers does, and the Tile
        #    ControlNet's input.
        init_image = self.image_processor.preprocess(image).to(device=device, dtype=dtype)
        with vae_tiles(self.vae, height * width > self.tile_above):
            encoded = self.vae.encode(init_image).latent_dist
        shift, factor = self.vae.config.shift_factor, self.vae.config.scaling_factor
        image_latents = (encoded.sample(generator=generator[0]) - shift) * factor
        control = self._control_latents((encoded.mode() - shift) * factor)

        # 3. Timesteps, shifted for one tile's tokens (the size each prediction is made at), and
        #    cut by strength as image-to-image cuts them.
        tile_tokens = (views[0].height // 2) * (views[0].width // 2)
        mu = calculate_shift(
            tile_tokens,
            self.scheduler.config.get("base_image_seq_len", 256),
            self.scheduler.config.get("max_image_seq_len", 4096),
            self.scheduler.config.get("base_shift", 0.5),
            self.scheduler.config.get("max_shift", 1.15),
        )
        sigmas = get_default_z_image_sigmas(num_inference_steps)
        _, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu
        )
        timesteps, steps = self.get_timesteps(num_inference_steps, strength, device)
        if steps < 1:
            raise ValueError(f"strength {strength} leaves no step of {num_inference_steps}")

        # 4. The canvas's noise from the job's generator, over the whole canvas at once.
        shape = (1, self.transformer.in_channels, latent_height, latent_width)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = self.scheduler.scale_noise(image_latents, timesteps[:1], noise)
        self._num_timesteps = len(timesteps) * len(views)  # progress counts tile steps

        # 5. Denoise: every view predicted at its own size, blended, one scheduler step per step.
        for i, t in enumerate(timesteps):
            blended = torch.zeros(shape, device=device, dtype=torch.float32)
            outputs: dict = {}
            for k, (view, weight) in enumerate(zip(views, weights, strict=True)):
                with CacheMixin.cache_context(self.transformer, f"tile {k}"):
                    tile_control = None if control is None else view.of(control)
                    prediction = self._predict(
                        view.of(latents),
                        t,
                        prompt_embeds,
                        negative_prompt_embeds,
                        tile_control,
                        controlnet_conditioning_scale,
                    )
                view.of(blended).add_(prediction * weight)
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i * len(views) + k, t, {}) or {}
            latents = self.scheduler.step(blended, t, latents, return_dict=False)[0]
            # As diffusers' loops take `prompt_embeds` back from the step-end callback (seed variety's
            # switch to the clean embeddings), at a step's end: every tile of a step sees the same.
            prompt_embeds = outputs.get("prompt_embeds", prompt_embeds)
        return ZImagePipelineOutput(images=latents)

    def _control_latents(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The canvas's control input for the Tile ControlNet (None without one): (1, C, 1, H, W)."""
        if self.controlnet is None:
            return None
        latents = latents.unsqueeze(2)
        missing = self.controlnet.config.control_in_dim - latents.shape[1]
        if missing > 0:  # a 2.x layout's mask and masked-image channels: zeros, as for text-to-image
            pad = torch.zeros(latents.shape[0], missing, *latents.shape[2:], device=latents.device)
            latents = torch.cat([latents, pad.to(latents.dtype)], dim=1)
        return latents

    def _predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: list[torch.Tensor],
        negative_prompt_embeds: list[torch.Tensor] | None,
        control: torch.Tensor | None,
        control_scale: float,
    ) -> torch.Tensor:
        """One tile's velocity, as ZImageImg2ImgPipeline's loop computes it for its whole latent
        (the guidance truncation and normalisation it skips at their defaults are skipped here)."""
        timestep = (1000 - t.expand(latents.shape[0])) / 1000
        rows = latents.to(self.transformer.dtype)
        embeds = prompt_embeds
        if self.do_classifier_free_guidance:
            rows, embeds, timestep = (
                rows.repeat(2, 1, 1, 1),
                prompt_embeds + negative_prompt_embeds,
                timestep.repeat(2),
            )
        inputs = list(rows.unsqueeze(2).unbind(dim=0))
        hints = None
        if control is not None:
            control = control.repeat(len(inputs), 1, 1, 1, 1).to(self.transformer.dtype)
            hints = self.controlnet(inputs, timestep, embeds, control, conditioning_scale=control_scale)
        extra = {"controlnet_block_samples": hints} if hints is not None else {}
        out = self.transformer(inputs, timestep, embeds, **extra)[0]
        if self.do_classifier_free_guidance:
            pos, neg = out[0].float(), out[1].float()
            prediction = (pos + self.guidance_scale * (pos - neg)).unsqueeze(0)
        else:
            prediction = torch.stack([row.float() for row in out], dim=0)
        return -prediction.squeeze(2)
