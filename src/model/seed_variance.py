"""Seed variety (`seed_variance`): noise of each image's own seed on the prompt embeddings, early steps.

Turbo is distilled to land on one picture per detailed prompt, so different seeds look alike. Noise
on the prompt's embeddings during the first steps moves the composition; the later steps run on the
clean embeddings, so the picture still follows the prompt. The rule is API.md's, exactly:

- with image seed s: g = a CPU generator seeded s; noise = randn(E.shape, g), then
  chosen = rand(E.shape, g) < fraction; E' = E + where(chosen, noise x strength x E.std(), 0), in
  float32, cast back to E's dtype. A CPU generator, so a seed draws the same noise on any device.
- step i of n (from 0) uses E' while i/n < until, then E. n is the number of steps the pipeline
  runs (`pipeline.num_timesteps`): below strength 1 an image-to-image job runs only the last of its
  `num_inference_steps` (src/model/acceleration.py's steps_run), and `until` is a share of those.

Each image has its own E', so the pipeline gets one embedding per image (num_images_per_prompt 1):
diffusers' Z-Image pipelines repeat a one-entry list to the same list when num_images_per_prompt is
the batch, and size every other input by the product, so the call is the same call otherwise. The
switch back uses the pipelines' own step-end callback, which takes `prompt_embeds` in every Z-Image
pipeline: the clean E from the prompt cache, not a second encode. The cache itself only ever holds E.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from src.request.seed_variance import SeedVariance

StepEnd = Callable[[Any, int, Any, dict], dict]


def perturbed(embeds: torch.Tensor, seed: int, setting: SeedVariance) -> torch.Tensor:
    """E' for one image: `embeds` (tokens, hidden) with noise drawn from `seed`; a new tensor."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(embeds.shape, generator=generator)
    chosen = torch.rand(embeds.shape, generator=generator) < setting.fraction
    clean = embeds.float()
    noise, chosen = noise.to(clean.device), chosen.to(clean.device)
    varied = clean + torch.where(chosen, noise * setting.strength * clean.std(), 0.0)
    return varied.to(embeds.dtype)


def uses_noise(step: int, steps: int, setting: SeedVariance) -> bool:
    """Whether step `step` of `steps` (from 0) runs on the noisy embeddings."""
    return step / steps < setting.until


def with_seed_variance(
    setting: SeedVariance | None, call: dict[str, Any], seeds: list[int]
) -> dict[str, Any]:
    """The pipeline call's arguments with `setting` applied; `call` itself when it is off.

    `call` holds the one-prompt `prompt_embeds` and `negative_prompt_embeds` lists,
    `num_images_per_prompt` = len(seeds) and `callback_on_step_end`, which keeps its work (progress)
    and gains the switch. The negative prompt's embeddings are never changed.
    """
    if setting is None or not setting.active:
        return call
    clean = call["prompt_embeds"][0]
    negative = call["negative_prompt_embeds"]
    step_end: StepEnd = call["callback_on_step_end"]
    plain = [clean] * len(seeds)

    def switch_back(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
        # Runs after step `step`: the embeddings it returns are those the next step uses.
        outputs = step_end(pipeline, step, timestep, tensors)
        if uses_noise(step + 1, pipeline.num_timesteps, setting):
            return outputs
        return {**outputs, "prompt_embeds": plain}

    return {
        **call,
        "prompt_embeds": [perturbed(clean, seed, setting) for seed in seeds],
        "negative_prompt_embeds": None if negative is None else negative * len(seeds),
        "num_images_per_prompt": 1,
        "callback_on_step_end": switch_back,
    }
