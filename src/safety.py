"""The safety checker: a transformers image classifier with an `nsfw` label.

Z-Image ships no checker, so the worker brings one (by default
Falconsai/nsfw_image_detection, a ViT-B/16). It runs on the decoded tensors while they
are still on the device, all images of a job in one batch, before anything is encoded
or uploaded. Preprocessing follows the model's own image-processor config (size,
mean, std), done with torch ops instead of the PIL round trip.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoImageProcessor, AutoModelForImageClassification

log = logging.getLogger(__name__)


class SafetyModelError(RuntimeError):
    """The classifier cannot serve as a safety checker (stops the worker at start)."""


class SafetyChecker:
    def __init__(
        self,
        model: torch.nn.Module,
        size: tuple[int, int],
        mean: list[float],
        std: list[float],
        nsfw_index: int,
        threshold: float,
    ) -> None:
        self.model = model.eval()
        self.size = size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mean = torch.tensor(mean, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
        self.nsfw_index = nsfw_index
        self.threshold = threshold

    @classmethod
    def load(cls, folder: Path, threshold: float, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(folder)
        labels = {int(i): str(name).lower() for i, name in (model.config.id2label or {}).items()}
        nsfw = [i for i, name in labels.items() if name == "nsfw"]
        if not nsfw:
            raise SafetyModelError(
                f"SAFETY_CHECKER_MODEL: the classifier at {folder} has no 'nsfw' label "
                f"(its labels: {sorted(labels.values()) or 'none'}); use a model whose id2label "
                "includes 'nsfw', or SAFETY_CHECKER_MODEL=none to turn checking off"
            )
        size = processor.size or {}
        side = size.get("shortest_edge", 224)
        height, width = size.get("height", side), size.get("width", side)
        mean = processor.image_mean if processor.do_normalize else [0.0, 0.0, 0.0]
        std = processor.image_std if processor.do_normalize else [1.0, 1.0, 1.0]
        log.info("safety checker: labels %s, flags P(nsfw) >= %g", sorted(labels.values()), threshold)
        return cls(model.to(device), (height, width), mean, std, nsfw[0], threshold)

    @torch.inference_mode()
    def nsfw_probabilities(self, images: torch.Tensor) -> list[float]:
        """P(nsfw) for each image of (n, 3, H, W) in [0, 1]."""
        pixels = images.to(self.device, self.dtype)
        pixels = F.interpolate(pixels, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        pixels = (pixels - self.mean) / self.std
        logits = self.model(pixel_values=pixels).logits.float()
        return logits.softmax(dim=-1)[:, self.nsfw_index].tolist()

    def flags(self, images: torch.Tensor) -> list[bool]:
        return [p >= self.threshold for p in self.nsfw_probabilities(images)]
