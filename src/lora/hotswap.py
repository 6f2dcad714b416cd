"""LoRAs on a compiled transformer (ZIMAGE_COMPILE=1): fixed slots whose weights each job overwrites.

torch.compile guards on the names of the active adapters and on their scales: loading one more
adapter, or `set_adapters` with other names or weights, recompiles the blocks (on the tiny model
the 9th such change exceeds dynamo's recompile limit and fails the job). So before the first
compile the transformer gets `MAX_LORAS` adapters, `slot0`..`slot2`, of rank `COMPILED_RANK` on
every linear layer, all zero and always active, their scalings turned into tensors (peft's
`prepare_model_for_compiled_hotswap`, what diffusers' `enable_lora_hotswap` does for one adapter).
A job hotswaps its LoRAs into the slots in place (diffusers' `hotswap=True`) with its scale
folded into `lora_B`, and zeroes the slots it does not use; tensors change, the graph does not.
A job without LoRAs disables the adapters and runs the base graph.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import ZImagePipeline
from peft.utils.hotswap import prepare_model_for_compiled_hotswap

from src.lora.files import MAX_LORAS
from src.runtime.errors import JobError

log = logging.getLogger(__name__)

# The highest LoRA rank a compiled worker takes: every slot is padded to it, so it costs memory
# and a little compute on every LoRA job (BENCHMARKS.md, "LoRA adapters").
COMPILED_RANK = 64
SLOTS = tuple(f"slot{i}" for i in range(MAX_LORAS))


class HotswapSlots:
    def __init__(self, pipe: ZImagePipeline, rank: int = COMPILED_RANK) -> None:
        self.pipe = pipe
        self.rank = rank
        transformer = pipe.transformer
        linears = {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        for slot in SLOTS:
            zeros = {}
            for name, module in linears.items():
                zeros[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, module.in_features)
                zeros[f"transformer.{name}.lora_B.weight"] = torch.zeros(module.out_features, rank)
            with warnings.catch_warnings():  # peft warns on every adapter after the first
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_into_transformer(
                    zeros, transformer=transformer, adapter_name=slot, _pipeline=pipe
                )
        pipe.set_adapters(list(SLOTS), [1.0] * len(SLOTS))  # before the scalings become tensors
        prepare_model_for_compiled_hotswap(transformer, target_rank=rank)
        pipe.disable_lora()
        self.content: list[tuple[str, float] | None] = [None] * len(SLOTS)
        log.info(
            "ZIMAGE_COMPILE: %d LoRA slots of rank %d on %d linear layers", len(SLOTS), rank, len(linears)
        )

    @contextmanager
    def all_zero_active(self) -> Iterator[None]:
        """Every slot active and all zero, then the base weights again: for the compile warm-up.

        The jobs run the adapters' graph (the one every LoRA job runs, whatever it holds) and make
        the base model's pixels, so a warm-up compiles it before the first LoRA job instead of in it.
        """
        for i, slot in enumerate(SLOTS):
            if self.content[i] is not None:
                self._zero(slot)
                self.content[i] = None
        self.pipe.enable_lora()
        try:
            yield
        finally:
            self.pipe.disable_lora()

    def holds(self, digest: str) -> bool:
        return any(entry is not None and entry[0] == digest for entry in self.content)

    def activate(self, prepared: list, read: Callable) -> None:
        if not prepared:
            self.pipe.disable_lora()
            return
        for i, slot in enumerate(SLOTS):
            lora = prepared[i] if i < len(prepared) else None
            wanted = (lora.file.digest, lora.scale) if lora is not None else None
            if self.content[i] == wanted:
                continue
            self.content[i] = None  # until the swap below has finished
            if lora is None:
                self._zero(slot)
            else:
                self._swap(slot, lora, read)
            self.content[i] = wanted
        self.pipe.enable_lora()
        log.info("LoRAs in slots: %s", ", ".join(f"{lora.file.short} x{lora.scale:g}" for lora in prepared))

    def _swap(self, slot: str, lora, read: Callable) -> None:
        if lora.state is None:
            lora.state, lora.metadata = read(lora.file)
        name = f"loras[{lora.file.index}]"
        ranks = {t.shape[0] for k, t in lora.state.items() if k.endswith("lora_A.weight")}
        if any(".lokr_" in key for key in lora.state):
            raise JobError(
                f"{name}: LoKr adapters cannot be swapped into a compiled model (ZIMAGE_COMPILE=1)"
            )
        if max(ranks, default=0) > self.rank:
            raise JobError(
                f"{name}: rank {max(ranks)} is over the {self.rank} that a compiled worker "
                "(ZIMAGE_COMPILE=1) takes; use a LoRA of a lower rank, or a worker without compile"
            )
        # The job's scale goes into lora_B: changing the slot's scaling would be another graph.
        scaled = {k: t * lora.scale if ".lora_B." in k else t for k, t in lora.state.items()}
        self._zero(slot)  # modules this LoRA does not touch keep nothing from the last one
        try:
            self.pipe.load_lora_into_transformer(
                scaled,
                transformer=self.pipe.transformer,
                adapter_name=slot,
                metadata=lora.metadata,
                _pipeline=self.pipe,
                hotswap=True,
            )
        except (ValueError, RuntimeError) as err:
            if isinstance(err, torch.OutOfMemoryError) or "CUDA" in str(err):
                raise
            self._zero(slot)
            raise JobError(
                f"{name}: the LoRA does not fit this Z-Image model's layers ({type(err).__name__})"
            ) from None

    def _zero(self, slot: str) -> None:
        with torch.no_grad():
            for module in self.pipe.transformer.modules():
                if hasattr(module, "lora_B") and slot in module.lora_B:
                    module.lora_B[slot].weight.zero_()
