"""Inpainting: diffusers' pipeline without the encode it wastes, and the last step that keeps the input.

diffusers' ZImageInpaintPipeline VAE-encodes the picture twice per image: once for the latents it
noises and blends with (`prepare_latents`), once more with the masked area blacked out
(`prepare_mask_latents`). Z-Image's transformer takes no masked-image channels, so the second
result is never read: the denoising loop blends with the first encode and the resized mask only.
`InpaintPipeline` keeps the mask half of that method and drops the encode. The pixels stay
bit-identical: the skipped encode draws from each image's generator, but after it nothing does
(the flow-matching scheduler's step takes none), so no later random number moves.

diffusers also keeps the unmasked area only in latent space, so after the VAE round trip those
pixels drift a little. The worker composites on the device, before the safety checker (which so
sees what is returned): out = in * (1 - m) + gen * m with m = mask / 255.
"""

from __future__ import annotations

import torch
from diffusers import ZImageInpaintPipeline
from PIL import Image

from src.inputs.pictures import Inputs
from src.model.pixels import from_pil, to_bytes


class InpaintPipeline(ZImageInpaintPipeline):
    """ZImageInpaintPipeline minus the masked-image VAE encode: one encode per image, not two."""

    def prepare_mask_latents(
        self,
        mask: torch.Tensor,
        masked_image: torch.Tensor,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, None]:
        """The mask at latent size and batch, as diffusers makes it; no masked-image latents (None)."""
        # The same arithmetic and checks as ZImageInpaintPipeline.prepare_mask_latents (diffusers 0.42.1).
        latent_height = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_width = 2 * (int(width) // (self.vae_scale_factor * 2))
        mask = torch.nn.functional.interpolate(mask, size=(latent_height, latent_width), mode="nearest")
        mask = mask.to(device=device, dtype=dtype)
        if mask.shape[0] < batch_size:
            if batch_size % mask.shape[0] != 0:
                raise ValueError(
                    f"The passed mask and the required batch size don't match: {mask.shape[0]} masks "
                    f"cannot be repeated to a batch of {batch_size}. Pass a number of masks that divides it."
                )
            mask = mask.repeat(batch_size // mask.shape[0], 1, 1, 1)
        return mask, None


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
