"""Inpainting's last step: outside the mask the output is the input itself, not the VAE's copy of it.

diffusers' ZImageInpaintPipeline keeps the unmasked area only in latent space, so after the VAE
round trip those pixels drift a little. The worker composites on the device, before the safety
checker (which so sees what is returned): out = in * (1 - m) + gen * m with m = mask / 255.
"""

from __future__ import annotations

import torch
from PIL import Image

from src.input_image import Inputs
from src.pixels import from_pil, to_bytes


def keeps_everything(mask: Image.Image | None) -> bool:
    """An all-black mask regenerates nothing: the job returns the fitted input without the model."""
    return mask is not None and mask.getextrema()[1] == 0


def composite(generated: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1] on the device -> the same, with the input kept where the mask is black.

    The blend runs on byte values: the generated images are first rounded as every output is
    (`to_bytes`, in their own dtype, bf16 on a GPU), so where m is 1 the bytes are exactly the
    generated ones, where m is 0 exactly the input's, and grey is linear between the two. The
    result is bytes / 255, which the output rounding turns back into the same bytes.
    """
    device = generated.device
    kept = from_pil(inputs.image, device)
    weight = from_pil(inputs.mask, device) / 255
    made = to_bytes(generated).float()
    return (kept * (1 - weight) + made * weight).round() / 255
