"""Tiny real LoRAs for the tiny Z-Image model: made with peft, saved in each trainer's key layout.

B is random (peft's default leaves it zero), so every LoRA really changes the picture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]
LAYOUTS = ("diffusers", "kohya", "comfyui")


def make_lora(model: Path, seed: int, rank: int = 4, alpha: float = 8.0) -> tuple[dict, LoraConfig]:
    """peft's LoRA tensors for the tiny transformer (`layers.0.attention.to_q.lora_A.weight`, ...)."""
    transformer = ZImageTransformer2DModel.from_pretrained(model / "transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, transformer)
    state = get_peft_model_state_dict(transformer)
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in state.items():
        # Large enough to move pixels by tens of levels after 2 steps, small enough to stay finite.
        state[key] = torch.randn(tensor.shape, generator=generator) * (0.3 if "lora_B" in key else 1.0)
    return state, config


def save_lora(state: dict, config: LoraConfig, path: Path, layout: str) -> Path:
    """One LoRA in a trainer's layout; all three load to the same weights in diffusers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":  # diffusers' own writer: `transformer.` keys, the peft config as metadata
        ZImagePipeline.save_lora_weights(
            path.parent,
            transformer_lora_layers=state,
            weight_name=path.name,
            transformer_lora_adapter_metadata=config.to_dict(),
        )
        return path
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".lora_", 1)
        if layout == "kohya":  # kohya sd-scripts and musubi-tuner
            stem = "lora_unet_" + module.replace(".", "_")
            out[f"{stem}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = tensor
            out[f"{stem}.alpha"] = torch.tensor(float(config.lora_alpha))
        elif layout == "comfyui":  # ComfyUI and ai-toolkit
            out[f"diffusion_model.{key}"] = tensor
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(config.lora_alpha))
        else:
            raise ValueError(layout)
    save_file(out, path)
    return path
