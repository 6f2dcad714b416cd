"""Tiny real ControlNets and a tiny Depth Anything for the tiny Z-Image model, built by the tests.

Each ControlNet release is the real `ZImageControlNetModel` at the tiny transformer's width, with
the release's own control layout (src/control/configs.py), saved both as a diffusers folder and
as alibaba-pai ships it: one `.safetensors` file of the control blocks. diffusers zero-initialises
the projections that feed the hints in (so a fresh ControlNet changes nothing); here every weight is
random, so control really moves pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ZImageControlNetModel
from safetensors.torch import save_file
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

from src.control.configs import release_config


def tiny_controlnet(model: Path, version: str, seed: int = 0) -> ZImageControlNetModel:
    """The release's layout at the tiny transformer's width, every weight random."""
    transformer_config = json.loads((model / "transformer" / "config.json").read_text())
    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(**release_config(version, transformer_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if "norm" in name and name.endswith("weight"):
                continue  # RMSNorm gains stay 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return controlnet


def save_controlnet(model: Path, version: str, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(a diffusers folder, a single-file release) of the same weights."""
    controlnet = tiny_controlnet(model, version, seed)
    controlnet.save_pretrained(folder / "diffusers", safe_serialization=True)
    state = {key: value.contiguous() for key, value in controlnet.state_dict().items()}
    file = folder / f"Z-Image-Turbo-Fun-Controlnet-Union-{version}.safetensors"
    save_file(state, file)
    return folder / "diffusers", file


def save_tile_controlnet(model: Path, folder: Path, seed: int = 3) -> Path:
    """Tile 2.1 as alibaba-pai ships it: the Union 2.1 layout, one file under the Tile release's name."""
    state = {
        key: value.contiguous() for key, value in tiny_controlnet(model, "2.1", seed).state_dict().items()
    }
    file = folder / "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, file)
    return file


def build_tiny_depth(path: Path) -> Path:
    """A real DepthAnythingForDepthEstimation on a 1-layer DINOv2, with a DPT processor at 56 px."""
    torch.manual_seed(0)
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 8, 8],
        fusion_hidden_size=8,
        head_hidden_size=8,
    )
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(path, safe_serialization=True)
    DPTImageProcessor(
        size={"height": 56, "width": 56}, keep_aspect_ratio=True, ensure_multiple_of=14, do_pad=False
    ).save_pretrained(path)
    return path
