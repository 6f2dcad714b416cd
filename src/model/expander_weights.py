"""The prompt expander's weights: the text encoder's own tensors wherever they are the same.

Z-Image's text encoder is a Qwen3-4B (transformers' Qwen3Model, no language-model head), and
Qwen3-4B ties its head to the embedding matrix. Public hashes say that Z-Image-Turbo's encoder
shards 1 and 2 are byte-identical to Qwen/Qwen3-4B's and shard 3 (layer 35's MLP) differs; the
image pipeline reads `hidden_states[-2]`, so layer 35 never reaches a picture, but it does
decide the next token. Nothing here relies on those facts: every tensor of the expander is
matched with the loaded encoder's, by name, shape and value, and

- a tensor in a file that is the encoder's own file (the same real file, as a baked image links
  them, or the same Hugging Face blob) is the encoder's tensor, with no byte read;
- a tensor in another file is read and compared with the encoder's loaded tensor (in the
  worker's dtype, on its device): equal, it is the encoder's tensor; else it is loaded;
- a language model of another shape (or not a Qwen3) shares nothing and loads whole, logged.

The causal LM is built on the meta device and given these tensors (`assign`), so the shared
ones are the encoder's Parameter objects (the same storage) and no second 8 GB copy is made.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen3ForCausalLM, Qwen3Model

log = logging.getLogger(__name__)

# The config fields that fix every tensor's shape and meaning; equal ones make sharing possible.
SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
)
HEAD = "lm_head.weight"


def missing_expander_files(folder: Path) -> list[str]:
    """What a transformers causal-LM folder with a tokenizer lacks (for src/model/files.py)."""
    from src.model.files import missing_weights

    needed = ["config.json", "tokenizer_config.json"]
    return [name for name in needed if not (folder / name).is_file()] + missing_weights(folder)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor's name (Qwen3Model's, without the causal LM's `model.` prefix) and its file.

    From the shard index when there is one, else from each file's header: no tensor is read.
    """
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return {_plain(name): folder / shard for name, shard in weight_map.items()}
    names: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            names.update((_plain(name), file) for name in reader.keys())  # noqa: SIM118
    return names


def _plain(name: str) -> str:
    return name.removeprefix("model.")


def same_file(a: Path, b: Path) -> bool:
    """The same real file, or two links to the same Hugging Face blob (named by its sha256).

    Without reading a byte: files that are only equal in content are compared tensor by tensor.
    """
    real_a, real_b = a.resolve(), b.resolve()
    if real_a == real_b:
        return True
    blobs = real_a.parent.name == real_b.parent.name == "blobs"
    return blobs and len(real_a.name) == 64 and real_a.name == real_b.name


def shares_shapes(config: object, encoder_config: object) -> bool:
    """Whether the expander is a Qwen3 of the encoder's shape (so its tensors can be the encoder's)."""
    if getattr(config, "model_type", None) != "qwen3":
        return False
    return all(getattr(config, key, None) == getattr(encoder_config, key, None) for key in SHAPE_FIELDS)


def load_expander_model(folder: Path, encoder: Qwen3Model, encoder_folder: Path | None) -> PreTrainedModel:
    """The expander's causal LM on the encoder's device and dtype, sharing the encoder's equal tensors."""
    device, dtype = encoder.device, encoder.dtype
    # B615 (no revision pinned) does not apply: a local folder, local_files_only=True.
    config = AutoConfig.from_pretrained(folder, local_files_only=True)  # nosec B615
    if encoder_folder is None or not shares_shapes(config, encoder.config):
        log.warning(
            "prompt expander %s: not a Qwen3 of the text encoder's shape: loaded whole, nothing shared",
            folder,
        )
        return _load_whole(folder, device, dtype)

    own = dict(encoder.named_parameters())
    encoder_files = tensor_files(encoder_folder)
    by_file: dict[Path, list[str]] = {}
    for name, file in tensor_files(folder).items():
        by_file.setdefault(file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    shared_unread = shared_compared = loaded_bytes = 0
    for file, names in by_file.items():
        to_read = []
        for name in names:
            theirs = encoder_files.get(name)
            if name in own and theirs is not None and same_file(file, theirs):
                state[name] = own[name]
                shared_unread += 1
            else:
                to_read.append(name)
        if not to_read:
            continue
        with safe_open(file, framework="pt", device="cpu") as reader:
            keys = set(reader.keys())
            for name in to_read:
                tensor = reader.get_tensor(name if name in keys else f"model.{name}")
                tensor = tensor.to(device=device, dtype=dtype)
                mine = own.get(name)
                if mine is not None and mine.shape == tensor.shape and torch.equal(mine.data, tensor):
                    state[name] = mine
                    shared_compared += 1
                else:
                    state[name] = torch.nn.Parameter(tensor, requires_grad=False)
                    loaded_bytes += tensor.nbytes
    shared = shared_unread + shared_compared
    if shared == 0:
        log.warning("prompt expander %s: no tensor equals the text encoder's: loaded whole", folder)
        return _load_whole(folder, device, dtype)

    causal = assemble_causal_lm(config, encoder, state, dtype)
    log.info(
        "prompt expander %s: %d tensors are the text encoder's (%d by file, %d compared), "
        "%d loaded (%.1f MB)",
        folder,
        shared,
        shared_unread,
        shared_compared,
        len(state) - shared,
        loaded_bytes / 1e6,
    )
    return causal


def assemble_causal_lm(
    config: object, encoder: Qwen3Model, state: dict[str, torch.Tensor], dtype: torch.dtype
) -> Qwen3ForCausalLM:
    """A Qwen3ForCausalLM made of the given tensors (no allocation of its own): `state` maps each
    Qwen3Model tensor name (and `lm_head.weight` when untied) to the encoder's Parameter or another."""
    config.dtype = dtype
    with torch.device("meta"):
        causal = Qwen3ForCausalLM(config)
    causal.requires_grad_(False)  # `assign` copies this flag onto the encoder's own parameters
    head = state.pop(HEAD, None)
    missing, unexpected = causal.model.load_state_dict(state, strict=False, assign=True)
    if unexpected or missing:
        raise ValueError(
            f"prompt expander: its tensors do not fit Qwen3ForCausalLM (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    # Non-persistent buffers (the rotary frequencies) are in no file: the encoder's, same config.
    causal.model.rotary_emb = encoder.rotary_emb
    if head is not None and not config.tie_word_embeddings:
        causal.lm_head.weight = head if isinstance(head, torch.nn.Parameter) else torch.nn.Parameter(head)
    else:  # Qwen3-4B: the head is the embedding matrix
        causal.lm_head.weight = causal.model.embed_tokens.weight
    left = [name for name, tensor in causal.state_dict().items() if tensor.is_meta]
    if left:
        raise ValueError(f"prompt expander: no weights for {left[:3]} in its files")
    causal.eval()
    return causal


def _load_whole(folder: Path, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    # B615 (no revision pinned) does not apply: a local folder, local_files_only=True.
    model = AutoModelForCausalLM.from_pretrained(  # nosec B615
        folder, dtype=dtype, use_safetensors=True, local_files_only=True
    )
    return model.to(device).eval()
