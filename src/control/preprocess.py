"""The control map: `control_image` fetched and fitted like `image`, then `control_preprocess` applied.

- `none`: the picture is the map (edges, depth, pose, lines, ... made elsewhere).
- `canny`: OpenCV's Canny on the CPU, on an I/O thread while another job holds the GPU; at 1024x1024
  it takes ~2 ms there, against ~600 ms for kornia's torch version on the same CPU (BENCHMARKS.md,
  "Control"), so the GPU would save nothing worth a second copy of the picture on it.
- `depth`: a transformers depth-estimation model (DEPTH_MODEL, Depth Anything V2 by default), which
  runs on the device, so on the GPU thread (`DepthEstimator`), normalised to a grey RGB map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from src.inputs.pictures import cover_crop, open_input
from src.request.schema import GenerateRequest
from src.runtime.errors import JobError

# OpenCV's usual pair (diffusers' and ControlNet's canny examples use it): edges of clear contrast,
# few from noise, in 8-bit pixel units.
CANNY_LOW, CANNY_HIGH = 100, 200


def load_control(request: GenerateRequest, opened: Image.Image | None = None) -> Image.Image | None:
    """The request's control map, as far as the CPU takes it: fetched, fitted, canny applied.

    `opened`: the `control_image`, already open (`size: "auto"` opened it first to read its size).
    """
    if request.control_image is None:
        return None
    if opened is None:
        opened = open_input(request.control_image, "control_image")
    picture = cover_crop(opened, request.width, request.height)
    return canny(picture) if request.control_preprocess == "canny" else picture


def canny(picture: Image.Image) -> Image.Image:
    """White edges on black, as RGB (the ControlNet reads a 3-channel picture through the VAE)."""
    import cv2  # imported here: only workers that serve control need OpenCV loaded

    grey = cv2.cvtColor(np.asarray(picture.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(edges).convert("RGB")


class DepthEstimator:
    """DEPTH_MODEL on the device: a picture in, its depth map (near = bright) as grey RGB out."""

    def __init__(self, model: torch.nn.Module, processor, device: torch.device) -> None:
        self.model, self.processor, self.device = model, processor, device

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> DepthEstimator:
        from transformers import AutoModelForDepthEstimation

        from src.model.files import load_vision_model

        model, processor = load_vision_model(
            AutoModelForDepthEstimation,
            folder,
            device,
            dtype,
            "DEPTH_MODEL",
            "DEPTH_MODEL=none to turn control_preprocess 'depth' off",
        )
        return cls(model, processor, device)

    @torch.inference_mode()
    def __call__(self, picture: Image.Image) -> Image.Image:
        dtype = next(self.model.parameters()).dtype
        pixels = self.processor(images=picture, return_tensors="pt")["pixel_values"]
        depth = self.model(pixel_values=pixels.to(self.device, dtype)).predicted_depth
        # Back to the picture's size, then stretched to 0..255: the map's scale is relative anyway.
        depth = torch.nn.functional.interpolate(
            depth[:, None].float(), size=(picture.height, picture.width), mode="bicubic", align_corners=False
        )[0, 0]
        low, high = depth.min(), depth.max()
        # Relative depth has no unit, and a model may answer in tiny values: only a flat map stays black.
        span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)
        grey = ((depth - low) / span * 255).round().clamp(0, 255).to(torch.uint8)
        return Image.fromarray(grey.cpu().numpy()).convert("RGB")


def no_depth_model() -> JobError:
    return JobError(
        "control_preprocess: 'depth' is not available on this worker (DEPTH_MODEL=none): use 'canny' or "
        "'none' with a depth map made elsewhere"
    )
