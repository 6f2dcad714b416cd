"""LoRA adapters in the transformer: fetched and read on an I/O thread, activated on the GPU thread.

`prepare` (I/O thread, beside other jobs) fetches each file (src/lora/files.py) and, for an
adapter not already loaded, reads its tensors. Nothing more: the key conversion is torch work
(concatenations, alpha scaling), and torch runs on the GPU thread only (src/runtime/gpu.py says why).

`activate` (GPU thread, inside the job's GPU stage) converts what was read with diffusers' own
Z-Image converter (diffusers/PEFT, kohya/musubi, ComfyUI/ai-toolkit, LoKr); a file whose keys
match no Z-Image transformer module fails naming `loras[i]` and what it looks like instead
(diffusers itself would only log a warning and leave the picture unchanged). It then loads
what is missing under a name taken from the file's sha256, and turns on exactly the job's
adapters at their scales; a job without
LoRAs disables every adapter, so the base weights run the same kernels as a worker that never
loaded one. Up to `LORA_MAX_LOADED` adapters stay loaded; the least recently used go first.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers import ZImagePipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from src.lora.files import LoraFile, LoraFiles
from src.lora.hotswap import HotswapSlots
from src.runtime.errors import JobError
from src.runtime.gpu import Stop

log = logging.getLogger(__name__)

# What a LoRA for another model looks like, by its keys; first match wins.
FOREIGN_LAYOUTS = (
    (r"single_transformer_blocks|double_blocks|single_blocks", "a Flux LoRA"),
    (r"joint_blocks|context_block", "a Stable Diffusion 3 LoRA"),
    (r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks", "a Stable Diffusion 1.x/SDXL UNet LoRA"),
    (r"transformer_blocks[._]\d+[._](img_mlp|txt_mlp|img_mod)", "a Qwen-Image LoRA"),
    (r"blocks[._]\d+[._](self_attn|cross_attn|ffn)", "a Wan video LoRA"),
    (r"^(lora_te\d?_|text_encoder|te\d?\.)", "a text-encoder LoRA"),
)
ADAPTER_KEY = re.compile(r"^transformer\.(.+?)\.(lora_[AB]|lora_down|lora_up|lokr_\w+)(\.weight)?$")


@dataclass
class PreparedLora:
    file: LoraFile
    scale: float
    # The file's tensors as read (I/O thread), then in diffusers' layout (GPU thread); both None
    # when the adapter was already loaded at prepare time.
    raw: dict[str, torch.Tensor] | None = None
    metadata: dict | None = None
    state: dict[str, torch.Tensor] | None = None

    @property
    def adapter(self) -> str:
        return f"lora_{self.file.digest[:16]}"


class LoraAdapters:
    def __init__(
        self, pipe: ZImagePipeline, files: LoraFiles, max_loaded: int, hotswap: bool = False
    ) -> None:
        """`hotswap`: the transformer is about to be compiled; LoRAs go into fixed slots instead."""
        self.pipe = pipe
        self.files = files
        self.max_loaded = max_loaded
        self.modules = {name for name, _ in pipe.transformer.named_modules() if name}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.slots = HotswapSlots(pipe) if hotswap else None

    def prepare(self, specs: list, stop: Stop) -> list[PreparedLora]:
        """I/O thread: each `loras[i]` as a checked local file, its tensors read unless already loaded."""
        prepared = []
        for index, spec in enumerate(specs):
            file = self.files.fetch(index, spec.path, stop)
            lora = PreparedLora(file, spec.scale)
            held = self.slots.holds(file.digest) if self.slots else lora.adapter in self.loaded
            if not held:  # a stale answer only means activate() reads it
                lora.raw, lora.metadata = self.load(file)
            prepared.append(lora)
        return prepared

    def read(self, file: LoraFile) -> tuple[dict[str, torch.Tensor], dict | None]:
        """GPU thread: the file's tensors in diffusers' layout and its PEFT metadata."""
        raw, metadata = self.load(file)
        return self.convert(file, raw), metadata

    @staticmethod
    def load(file: LoraFile) -> tuple[dict[str, torch.Tensor], dict | None]:
        """The file's tensors as stored, and its PEFT metadata; only reads, so any thread may."""
        try:
            raw = load_file(file.path, device="cpu")
            with safe_open(file.path, framework="pt") as handle:
                meta = (handle.metadata() or {}).get(LORA_ADAPTER_METADATA_KEY)
            return raw, json.loads(meta) if meta else None
        except (SafetensorError, OSError, ValueError) as err:
            raise JobError(
                f"loras[{file.index}]: the safetensors file cannot be read ({type(err).__name__})"
            ) from None

    def convert(self, file: LoraFile, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GPU thread: diffusers' conversion, keeping only the tensors for Z-Image modules."""
        name = f"loras[{file.index}]"
        try:
            converted = ZImagePipeline.lora_state_dict(dict(raw))
        except (ValueError, KeyError, IndexError, RuntimeError, AttributeError):
            converted = {}  # a layout the converter trips on: reported below by what it looks like
        state = {}
        unmatched = 0
        for key, tensor in converted.items():
            match = ADAPTER_KEY.match(key)
            if match and match[1] in self.modules:
                state[key] = tensor
            else:
                unmatched += 1
        if not state:
            raise JobError(
                f"{name}: {len(raw)} tensors, none for a Z-Image transformer module: it looks like "
                f"{looks_like(list(raw))}. Use a LoRA trained for Z-Image (Turbo)."
            )
        if unmatched:
            log.warning("%s (%s): %d tensors match no Z-Image module, ignored", name, file.short, unmatched)
        return state

    def activate(self, prepared: list[PreparedLora]) -> None:
        """On the GPU thread: exactly these adapters at these scales, or none (the base weights)."""
        for lora in prepared:  # every file is checked, whether or not it gets loaded below
            if lora.raw is not None:
                lora.state, lora.raw = self.convert(lora.file, lora.raw), None
        if self.slots is not None:
            self.slots.activate(prepared, self.read)
            return
        if not prepared:
            if self.loaded:
                self.pipe.disable_lora()
            return
        wanted = [lora.adapter for lora in prepared]
        self._unload_for(wanted)
        for lora in prepared:
            if lora.adapter not in self.loaded:
                if lora.state is None:  # unloaded since prepare() by another job
                    lora.state, lora.metadata = self.read(lora.file)
                self._load(lora)
            self.loaded.move_to_end(lora.adapter)
        self.pipe.enable_lora()
        self.pipe.set_adapters(wanted, [lora.scale for lora in prepared])
        log.info("LoRAs active: %s", ", ".join(f"{lora.file.short} x{lora.scale:g}" for lora in prepared))

    def _load(self, lora: PreparedLora) -> None:
        try:
            with warnings.catch_warnings():
                # peft warns on every adapter after the first; several adapters are the point here.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.pipe.load_lora_into_transformer(
                    lora.state,
                    transformer=self.pipe.transformer,
                    adapter_name=lora.adapter,
                    metadata=lora.metadata,
                    _pipeline=self.pipe,
                    low_cpu_mem_usage=_LOW_CPU_MEM_USAGE_DEFAULT_LORA,
                )
        except (ValueError, RuntimeError, KeyError) as err:
            if isinstance(err, torch.OutOfMemoryError) or "CUDA" in str(err):
                raise  # src/runtime/gpu.py tells out-of-memory and GPU faults apart
            log.warning("loras[%d] (%s) does not load: %s", lora.file.index, lora.file.short, err)
            raise JobError(
                f"loras[{lora.file.index}]: the LoRA does not fit this Z-Image model's layers "
                f"(shapes or layout differ: {type(err).__name__})"
            ) from None
        lora.state = None  # the tensors now live in the transformer
        self.loaded[lora.adapter] = None
        log.info("loras[%d]: loaded adapter %s", lora.file.index, lora.file.short)

    def _unload_for(self, wanted: list[str]) -> None:
        """Unload least recently used adapters so this job's fit within LORA_MAX_LOADED."""
        new = sum(name not in self.loaded for name in wanted)
        budget = max(self.max_loaded, len(wanted))
        for name in list(self.loaded):
            if len(self.loaded) + new <= budget:
                break
            if name not in wanted:
                with warnings.catch_warnings():  # "was active which is now deleted": it is not needed
                    warnings.simplefilter("ignore", UserWarning)
                    self.pipe.delete_adapters(name)
                del self.loaded[name]
                log.info("unloaded adapter %s (LORA_MAX_LOADED=%d)", name[5:17], self.max_loaded)


def looks_like(keys: list[str]) -> str:
    """A LoRA for another model, named from its keys; else a sample key."""
    for pattern, description in FOREIGN_LAYOUTS:
        if any(re.search(pattern, key) for key in keys):
            return description
    sample = re.sub(r"[^\w.]", "?", keys[0][:80]) if keys else ""
    return f"keys like {sample!r}" if sample else "an empty file"
