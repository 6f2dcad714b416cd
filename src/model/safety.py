"""The safety checker: a transformers image classifier with an `nsfw` label.

Z-Image ships no checker, so the worker brings one (by default
Falconsai/nsfw_image_detection, a ViT-B/16). It runs on the decoded tensors while they
are still on the device, all images of a job in one batch, before anything is encoded
or uploaded. Preprocessing follows the model's own image-processor config (size,
rescale, mean, std), done with torch ops instead of the PIL round trip: the images are
already [0, 1] tensors on the device, and copying them to the CPU as PIL images would
cost more than the classifier itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

log = logging.getLogger(__name__)

NSFW_LABEL = "nsfw"


class SafetyModelError(RuntimeError):
    """The classifier cannot serve as a safety checker (stops the worker at start)."""


@dataclass(frozen=True)
class Preprocessing:
    """What the model's image processor does to a [0, 1] image, as torch ops can redo it."""

    resize: tuple[int, int] | int  # (height, width) exactly, or the shortest edge keeping the aspect
    crop: tuple[int, int] | None  # centre crop after a shortest-edge resize
    scale: float  # multiplies [0, 1] pixels into what `rescale_factor` would give from 0..255
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocessing:
        size = _size_fields(processor.size)
        if size.get("height") and size.get("width"):
            resize: tuple[int, int] | int = (size["height"], size["width"])
        elif size.get("shortest_edge"):
            resize = size["shortest_edge"]
        else:
            raise SafetyModelError(
                f"SAFETY_CHECKER_MODEL: its image processor's size {processor.size!r} names neither "
                "height and width nor shortest_edge, so the checker cannot tell what to feed the model"
            )
        crop = None
        if isinstance(resize, int) and getattr(processor, "do_center_crop", False):
            crop_size = _size_fields(getattr(processor, "crop_size", None))
            if crop_size.get("height") and crop_size.get("width"):
                crop = (crop_size["height"], crop_size["width"])
        # Pixels arrive in [0, 1], i.e. already 0..255 x 1/255: only a different factor changes them.
        scale = 255.0 * processor.rescale_factor if getattr(processor, "do_rescale", True) else 255.0
        if getattr(processor, "do_normalize", False):
            mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(resize, crop, scale, mean, std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.resize, int):
            height, width = images.shape[-2:]
            ratio = self.resize / min(height, width)
            size = (max(1, round(height * ratio)), max(1, round(width * ratio)))
        else:
            size = self.resize
        # Bilinear with antialiasing is what PIL's BILINEAR resize (ViT's default) does.
        pixels = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        if self.crop is not None:
            top = max(0, (pixels.shape[-2] - self.crop[0]) // 2)
            left = max(0, (pixels.shape[-1] - self.crop[1]) // 2)
            pixels = pixels[..., top : top + self.crop[0], left : left + self.crop[1]]
        mean = torch.tensor(self.mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
        return (pixels * self.scale - mean) / std


class SafetyChecker:
    def __init__(
        self, model: torch.nn.Module, preprocess: Preprocessing, nsfw_index: int, threshold: float
    ) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.preprocess = preprocess
        self.nsfw_index = nsfw_index
        self.threshold = threshold

    @classmethod
    def load(cls, folder: Path, threshold: float, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        """Load the classifier from a complete local folder, refusing one without an `nsfw` label."""
        try:
            # The labels come from the config alone: a wrong model is refused before its weights load.
            # B615 (no revision pinned) does not apply: a local folder, local_files_only=True.
            config = AutoConfig.from_pretrained(folder, local_files_only=True)  # nosec B615
            nsfw_index = nsfw_label_index(config.id2label, folder)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)  # nosec B615
            model = AutoModelForImageClassification.from_pretrained(  # nosec B615
                folder, config=config, dtype=dtype, use_safetensors=True, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise SafetyModelError(
                f"SAFETY_CHECKER_MODEL: the folder {folder} does not load as a transformers "
                f"image-classification model ({type(err).__name__}: {str(err)[:300]}); use a model such as "
                "Falconsai/nsfw_image_detection, or SAFETY_CHECKER_MODEL=none to turn checking off"
            ) from err
        preprocess = Preprocessing.from_processor(processor)
        log.info(
            "safety checker: %s, labels %s, input %s, flags P(nsfw) >= %g",
            type(model).__name__,
            sorted(str(name) for name in config.id2label.values()),
            preprocess.crop or preprocess.resize,
            threshold,
        )
        return cls(model.to(device), preprocess, nsfw_index, threshold)

    @torch.inference_mode()
    def nsfw_probabilities(self, images: torch.Tensor) -> list[float]:
        """P(nsfw) for each image of (n, 3, H, W) in [0, 1], in one batch."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (n, 3, H, W), got {tuple(images.shape)}")
        # Resize and normalise in float32 (bf16 would round the mean and std), then the model's dtype.
        pixels = self.preprocess(images.to(self.device, torch.float32)).to(self.dtype)
        logits = self.model(pixel_values=pixels).logits.float()
        return logits.softmax(dim=-1)[:, self.nsfw_index].tolist()

    def flags(self, images: torch.Tensor) -> list[bool]:
        """One bool per image: P(nsfw) >= threshold. An undefined score (NaN) is flagged: fail closed."""
        probabilities = self.nsfw_probabilities(images)
        if any(math.isnan(p) for p in probabilities):
            log.warning("safety checker returned NaN for some images; they are treated as flagged")
        return [math.isnan(p) or p >= self.threshold for p in probabilities]


def nsfw_label_index(id2label: dict[Any, Any] | None, folder: Path | str) -> int:
    """The index of the `nsfw` label (case-insensitive) in a model's id2label."""
    labels = {int(i): str(name).strip().lower() for i, name in (id2label or {}).items()}
    found = [i for i, name in labels.items() if name == NSFW_LABEL]
    if not found:
        raise SafetyModelError(
            f"SAFETY_CHECKER_MODEL: the classifier at {folder} has no {NSFW_LABEL!r} label "
            f"(its labels: {', '.join(sorted(labels.values())) or 'none'}); use a model whose "
            f"config.json id2label includes {NSFW_LABEL!r}, or SAFETY_CHECKER_MODEL=none to turn checking off"
        )
    return found[0]


def _size_fields(size: Any) -> dict[str, int]:
    """A processor's size as a plain dict of the fields that are set (a dict, a SizeDict, or an int)."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    keys = ("height", "width", "shortest_edge")
    # transformers 5 hands back a SizeDict whose unset fields are None, not missing.
    return {key: int(value) for key in keys if (value := _get(size, key)) is not None}


def _get(size: Any, key: str) -> Any:
    return size.get(key) if hasattr(size, "get") else getattr(size, key, None)
