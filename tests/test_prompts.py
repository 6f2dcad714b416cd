"""Prompts padded to their own length embed as diffusers' 512-padded ones do; the cache reuses them."""

from __future__ import annotations

import pytest
import torch

from src.model.pipeline import load_pipeline
from src.model.prompts import MAX_SEQUENCE_LENGTH, PromptEncoder


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model, torch.float32)


@pytest.mark.parametrize(
    "prompt",
    ["a cat", "一只猫坐在红色沙发上", "", "portrait of an astronaut, cinematic " * 40, "x" * 4000],
    ids=["short", "chinese", "empty", "long", "truncated"],
)
def test_embeddings_equal_diffusers_max_length_padding(pipe, prompt):
    encoder = PromptEncoder(pipe, torch.device("cpu"))
    with torch.inference_mode():
        reference, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    ours = encoder.embed(prompt)
    assert ours.shape == reference[0].shape
    assert ours.shape[0] <= MAX_SEQUENCE_LENGTH
    # Identical up to float32 rounding: the real tokens' states do not depend on the pads,
    # but a shorter sequence sums its attention in another order (seen: 4e-9 on values ~0.07).
    torch.testing.assert_close(ours, reference[0], rtol=1e-5, atol=1e-6)


def test_a_repeated_prompt_comes_from_the_cache(pipe):
    encoder = PromptEncoder(pipe, torch.device("cpu"), cache_size=2)
    calls = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        first = encoder.embed("a cat")
        assert encoder.embed("a cat") is first and len(calls) == 1
        encoder.embed("a dog")
        encoder.embed("a cow")  # evicts "a cat", the least recently used
        encoder.embed("a cat")
        assert len(calls) == 4
    finally:
        hook.remove()
