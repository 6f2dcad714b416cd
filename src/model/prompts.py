"""Prompt embeddings: padded to the prompt's own length, and kept in a small LRU cache.

diffusers pads every prompt to 512 tokens and then keeps only the real tokens' hidden
states. The text encoder is causal and masked, so the padding never changes those
states; it only costs compute (a 20-token prompt pays for 512). Here each prompt is
padded to its own length (still truncated at 512 like diffusers), through diffusers' own
`encode_prompt`, and the result is cached: a repeated prompt costs nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers import ZImagePipeline

from src.model.residence import Residence, resident

MAX_SEQUENCE_LENGTH = 512  # diffusers' default for Z-Image
CACHE_SIZE = 64  # Qwen3-4B: at most 512 x 2560 bf16 values (2.6 MB) a prompt


class PromptEncoder:
    def __init__(self, pipe: ZImagePipeline, device: torch.device, cache_size: int = CACHE_SIZE) -> None:
        self.pipe, self.device, self.cache_size = pipe, device, cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # Where the text encoder lives between prompts; the memory plan may move it (placement.py).
        self.residence: Residence = resident(device)

    def embed(self, text: str) -> torch.Tensor:
        """Hidden states of the prompt's real tokens, (tokens, hidden), on the device."""
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        with torch.inference_mode(), self.residence.use():
            embeds, _ = self.pipe.encode_prompt(
                prompt=text,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.token_count(text),
            )
        self._cache[text] = embeds[0]
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embeds[0]

    def token_count(self, text: str) -> int:
        """Tokens of the chat-templated prompt, as diffusers' `_encode_prompt` builds it."""
        templated = self.pipe.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        return min(len(self.pipe.tokenizer(templated).input_ids), MAX_SEQUENCE_LENGTH)
