"""Prompt expansion: the worker's own Qwen3 rewrites a prompt into a detailed one before encoding.

The language model is the text encoder plus whatever differs (src/model/expander_weights.py).
A rewrite is Qwen3's chat template with thinking off, this file's system prompt and the
caller's prompt, then a sampled reply of at most MAX_NEW_TOKENS tokens that stops at the end of
the turn. Sampling is Qwen3's recommended non-thinking setting, through transformers' own
logits warpers, drawn with a `torch.Generator` seeded from the request's seed: the loop below
is `generate(do_sample=True)`'s, token for token (tests/test_expansion.py checks it against
`generate` run after `torch.manual_seed(seed)`), without touching the global RNG.

Decoding keeps a KV cache. On CUDA, a prompt that fits STATIC_TOKENS uses a static cache and a
compiled one-token step (CUDA graphs): Python's launch overhead is most of a 4B model's token time.
Everything here runs on the GPU thread (src/runtime/gpu.py), like every torch op of the worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from src.model.residence import Residence, resident
from src.runtime.errors import JobError

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 300
# Qwen3's recommended sampling without thinking (its model card).
TEMPERATURE, TOP_K, TOP_P = 0.7, 20, 0.8
STATIC_TOKENS = 1024  # the static cache's length on CUDA; a longer rewrite uses the dynamic one
CACHE_SIZE = 256  # expansions kept: a few hundred bytes each
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")

SYSTEM_PROMPT = "\n".join(
    [
        "You rewrite prompts for a text-to-image model. Reply with the rewritten prompt only.",
        "",
        "Rules:",
        "- Keep every subject, count, name, brand, place and attribute the prompt gives. Do not add, "
        "remove or change the people or objects it names, and do not change any number.",
        "- Text to be drawn in the image (on signs, labels, shirts, screens, books) is copied verbatim, "
        "in double quotes, in its original language and spelling.",
        "- Add what makes a good picture: composition and camera angle, setting and background, lighting "
        "and time of day, colours, materials and textures, mood, and the style or medium (photograph, "
        "oil painting, 3D render, anime...) when the prompt leaves it open. Keep the prompt's own style "
        "when it names one.",
        "- Write one paragraph of plain description, about 60 to 150 words: no lists, no headings, no "
        "explanations.",
        '- No quality tags or filler such as "8k", "4k", "masterpiece", "best quality", "highly detailed", '
        '"trending on artstation".',
        "- Write in the prompt's own language: a Chinese prompt gets a Chinese description, an English "
        "prompt an English one.",
    ]
)


def no_expander() -> JobError:
    return JobError(
        "enable_prompt_expansion: this worker has no prompt expander (started with "
        "PROMPT_EXPANDER_MODEL=none): leave 'enable_prompt_expansion' out or false, or send the job "
        "to a worker with PROMPT_EXPANDER_MODEL set"
    )


def warpers() -> LogitsProcessorList:
    """The logits warpers `generate(do_sample=True, temperature, top_k, top_p)` applies, in its order."""
    return LogitsProcessorList(
        [TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)]
    )


def strip_thinking(text: str) -> str:
    """The reply without any think block (closed, or cut off by the token cap) and outer blanks."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    text = re.sub(r"<think>.*\Z", "", text, flags=re.DOTALL)
    return text.replace("</think>", "").strip()


def fingerprint(text: str) -> str:
    """What logs show of a text: its length and a short hash, never the words."""
    return f"{len(text)} chars sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"


Step = Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor]


@dataclass
class Expansion:
    """A rewrite's result: the text (None when the model gave nothing) and whether the cache had it."""

    text: str | None
    cached: bool


class PromptExpander:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str,
        max_new_tokens: int = MAX_NEW_TOKENS,
        compile_decoding: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens = max_new_tokens
        self.device = model.device
        vocab = tokenizer.get_vocab()
        self.stop_ids = {vocab[token] for token in END_OF_TURN if token in vocab}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(tokenizer.eos_token_id)
        self._cache: OrderedDict[tuple[str, int, str], str | None] = OrderedDict()
        # The compiled one-token step over a static cache: CUDA only, where launch overhead dominates.
        self._static = compile_decoding and self.device.type == "cuda"
        self._compiled_step: Step | None = None
        self._static_cache: StaticCache | None = None
        # Where the weights live between rewrites; the memory plan may move them (`offload`).
        self.residence: Residence = resident(self.device)
        if self._static:
            # On disk, as for the transformer's compile (src/model/pipeline.py): a restarted worker
            # reads the kernels instead of compiling them again.
            volume = Path("/runpod-volume")
            cache = (volume if volume.is_dir() else Path.home() / ".cache") / "zimage-compile-cache"
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            self._compiled_step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    def offload(self, residence: Residence) -> None:
        """Weights in CPU memory between rewrites, brought over for each. Decoding stays eager: a
        CUDA graph replays the addresses it was captured with, which a move changes."""
        self.residence, self._static = residence, False

    @classmethod
    def load(cls, folder: Path, model: PreTrainedModel, name: str) -> PromptExpander:
        # B615 (no revision pinned) does not apply: a local folder, local_files_only=True.
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)  # nosec B615
        return cls(model, tokenizer, name, compile_decoding=True)

    def expand(self, prompt: str, seed: int) -> Expansion:
        """The rewrite of `prompt` sampled with `seed`, from the cache when this one was made before."""
        key = (prompt, seed, self.name)
        if key in self._cache:
            self._cache.move_to_end(key)
            result = Expansion(self._cache[key], cached=True)
        else:
            tokens = self.sample(self.input_ids(prompt), seed)
            text = strip_thinking(self.tokenizer.decode(tokens, skip_special_tokens=True)) or None
            result = Expansion(text, cached=False)
            self._cache[key] = text
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        if result.text is None:
            log.warning("prompt expansion: empty reply; the prompt is used as sent, and not charged")
        else:
            log.info("prompt expansion: %s%s", fingerprint(result.text), " (cached)" if result.cached else "")
        return result

    def input_ids(self, prompt: str) -> torch.Tensor:
        """The chat-templated conversation, thinking off, as (1, tokens) on the device."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        return ids.to(self.device)

    def sample(self, input_ids: torch.Tensor, seed: int | None) -> list[int]:
        """New token ids up to the end of the turn (excluded) or the cap; `seed` None: greedy.

        `generate`'s sampling loop: the last position's logits in fp32, its warpers, softmax,
        one `multinomial` draw per token, but from this job's generator.
        """
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        process = warpers()
        length = input_ids.shape[1]
        static = self._static and length + self.max_new_tokens <= STATIC_TOKENS
        config = self.model.config
        step = self._compiled_step if static else self._step
        sequence, new = input_ids, []
        with torch.inference_mode(), self.residence.use():
            cache = self._reset_static_cache() if static else DynamicCache(config=config)
            # The prompt in one eager pass (its length varies); then one token a step.
            positions = torch.arange(length, device=self.device)
            logits = self._step(input_ids, cache, positions)
            for _ in range(self.max_new_tokens):
                if generator is None:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(process(sequence, logits), dim=-1)
                    token = torch.multinomial(probs, num_samples=1, generator=generator)
                value = int(token)
                if value in self.stop_ids:
                    break
                new.append(value)
                sequence = torch.cat([sequence, token], dim=1)
                positions = positions[-1:] + 1
                logits = step(token, cache, positions)
                if static:
                    logits = logits.clone()  # CUDA graphs reuse their output buffer
        return new

    def _reset_static_cache(self) -> StaticCache:
        """One static cache for every rewrite, emptied: the CUDA graphs keep its tensors' addresses."""
        if self._static_cache is None:
            self._static_cache = StaticCache(config=self.model.config, max_cache_len=STATIC_TOKENS)
        else:
            self._static_cache.reset()
        return self._static_cache

    def _step(self, input_ids: torch.Tensor, cache: object, positions: torch.Tensor) -> torch.Tensor:
        """The next-token logits (1, vocab) in fp32, the cache extended by `input_ids`."""
        out = self.model(
            input_ids=input_ids,
            past_key_values=cache,
            cache_position=positions,
            position_ids=positions.unsqueeze(0),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].to(dtype=torch.float32)

    def warm_up(self) -> None:
        """One rewrite, so CUDA set-up (and the compile, on a GPU) is not billed to a caller.

        A compiled step that fails here is dropped, logged: the eager loop (same sampling) serves instead.
        """
        ids = self.input_ids("warm-up")
        if self._static:
            try:
                self.sample(ids, seed=0)
            except Exception as err:  # an inductor or CUDA-graph failure must not stop the worker
                log.warning("prompt expander: compiled decoding failed (%s); decoding eagerly", err)
                self._static = False
        self.sample(ids, seed=0)
