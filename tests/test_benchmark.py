"""The GPU benchmark's full-size model has Z-Image Turbo's real sizes (built on the meta device)."""

from __future__ import annotations

import torch

from benchmarks.run import full_size_pipeline


def test_full_size_architecture_matches_the_published_model():
    pipe = full_size_pipeline("meta")
    count = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "text_encoder", "vae")
    }
    assert 6.1e9 < count["transformer"] < 6.2e9  # "about 6.15B transformer parameters"
    assert 3.9e9 < count["text_encoder"] < 4.1e9  # Qwen3-4B without its LM head
    assert 8.0e7 < count["vae"] < 9.0e7  # the FLUX VAE
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert pipe.vae_scale_factor == 8 and pipe.transformer.in_channels == 16
