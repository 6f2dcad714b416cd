"""Z-Image Turbo's and Qwen3-4B's published architectures (their configs) with random bf16 weights.

Speed does not depend on the weights' values, so the GPU benchmarks time these as the real
models; the tokenizer is the tiny one, whose vocabulary only changes which ids appear.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from builder.tiny_model import tiny_tokenizer

# Qwen/Qwen3-4B's config.json: the shapes that set the decoding cost.
QWEN3_4B = dict(
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    tie_word_embeddings=True,
)


def full_size_pipeline(device: str = "cuda") -> ZImagePipeline:
    """Z-Image Turbo's published architecture (its configs) with random bf16 weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: fp32 first would need 40 GB
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                axes_lens=[1536, 512, 512],
            )  # fmt: skip
            text_encoder = Qwen3Model(Qwen3Config(**QWEN3_4B))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
            )  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    # The tokenizer's vocabulary only changes which ids appear, not the compute.
    return ZImagePipeline(scheduler, vae, text_encoder, tiny_tokenizer(), transformer)


def build_full_size(folder: Path) -> Path:
    """The full-size random model saved to disk, so the cold start reads real-sized files."""
    pipe = full_size_pipeline("cuda")
    with torch.no_grad():  # torch.empty-initialised pad tokens could hold NaNs
        pipe.transformer.x_pad_token.fill_(1.0)
        pipe.transformer.cap_pad_token.fill_(1.0)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    torch.cuda.empty_cache()
    return folder


def full_size_expander(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> Qwen3ForCausalLM:
    """Qwen3-4B with its LM head: the prompt expander's decoding cost."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B)).eval()
    finally:
        torch.set_default_dtype(previous)
