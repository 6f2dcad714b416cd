"""Pixels between PIL images and device tensors, with the one rounding every output goes through."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> byte values 0..255, still a tensor of the images' dtype and device.

    Rounded in that dtype, as the returned images are: code that mixes in other pixels
    (inpainting) starts from exactly the bytes a caller would otherwise get.
    """
    return (images * 255).round().clamp(0, 255)


def from_pil(image: Image.Image, device: torch.device) -> torch.Tensor:
    """An RGB or L image -> (1, C, H, W) float32 byte values 0..255 on the device."""
    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1).copy())
    return tensor.permute(2, 0, 1).unsqueeze(0).to(device, torch.float32)
