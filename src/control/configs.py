"""The configs of alibaba-pai's single-file Z-Image-Turbo Fun ControlNet Union releases, and which is which.

alibaba-pai publishes each version as one `.safetensors` file without a diffusers config; diffusers'
`from_single_file` would fetch one from a Hub mirror at start, which a worker without network cannot.
The worker ships the values itself. Only the control-specific ones differ between versions; the body
(width, heads, refiner depth, patch sizes, norm) must be the transformer's, because the ControlNet runs
the transformer's own embedders and refiners (`ZImageControlNetModel.from_transformer`), so those are
read from the loaded transformer's config (`body_of`).

Where each value comes from:
- `control_layers_places`: the transformer layers a hint is added after. 1.0: six control blocks
  (`control_layers.0`..`5` in the file) at every fifth layer, VideoX-Fun
  `config/z_image/z_image_control.yaml`.
  2.x: fifteen (`control_layers.0`..`14`; diffusers tells 2.x by `control_layers.14`) at every even layer
  of the 30, VideoX-Fun `z_image_control_2.0.yaml` / `_2.1.yaml`.
- `control_refiner_layers_places`: 2.x adds hints after both noise-refiner layers (0 and 1), VideoX-Fun's
  yaml; 1.0 adds none there (its `control_noise_refiner` blocks are plain ones, run on the control context).
- `control_in_dim`: the width of `control_all_x_embedder.2-1.weight` over 2x2 patches. 1.0: 16, the control
  latents alone. 2.x: 33 = 16 control latents + 1 mask + 16 masked-image latents, the order
  `ZImageControlNetInpaintPipeline` concatenates them in (text-to-image pads the 17 with zeros).
- `add_control_noise_refiner`: 1.0 None; 2.1 "control_noise_refiner" (its own refiner blocks with
  `before_proj`); 2.0 "control_layers": 2.0 was trained with refiner hints from its control layers and
  its `control_noise_refiner.0.before_proj` is absent or all zero, which is how diffusers'
  `infer_diffusers_model_type` tells it from 2.1; `convert_z_image_controlnet_checkpoint_to_diffusers`
  then drops those weights, as `load_release` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

CONTROL_CONFIGS: dict[str, dict[str, Any]] = {
    "1.0": {
        "control_layers_places": [0, 5, 10, 15, 20, 25],
        "control_refiner_layers_places": None,
        "control_in_dim": 16,
        "add_control_noise_refiner": None,
    },
    "2.0": {
        "control_layers_places": list(range(0, 30, 2)),
        "control_refiner_layers_places": [0, 1],
        "control_in_dim": 33,
        "add_control_noise_refiner": "control_layers",
    },
    "2.1": {
        "control_layers_places": list(range(0, 30, 2)),
        "control_refiner_layers_places": [0, 1],
        "control_in_dim": 33,
        "add_control_noise_refiner": "control_noise_refiner",
    },
}
# The keys diffusers' single-file loader tells the releases by (loaders/single_file_utils.py).
KEY_2X = "control_layers.14.adaLN_modulation.0.weight"
KEY_ANY = "control_all_x_embedder.2-1.weight"
KEY_REFINER_PROJ = "control_noise_refiner.0.before_proj.weight"
# The transformer config keys the ControlNet's body takes over.
BODY_KEYS = ("all_patch_size", "all_f_patch_size", "dim", "n_refiner_layers", "n_heads", "n_kv_heads")


def detect_version(state: Mapping[str, torch.Tensor]) -> str | None:
    """ "1.0", "2.0" or "2.1" from a release's keys, or None when it is none of them."""
    if KEY_2X in state:
        proj = state.get(KEY_REFINER_PROJ)
        return "2.0" if proj is None or not torch.any(proj != 0) else "2.1"
    if KEY_ANY in state:
        return "1.0"
    return None


def body_of(transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture values a ControlNet shares with the transformer it plugs into."""
    body = {key: transformer_config[key] for key in BODY_KEYS}
    body.update(
        norm_eps=transformer_config.get("norm_eps", 1e-5), qk_norm=transformer_config.get("qk_norm", True)
    )
    body["all_patch_size"], body["all_f_patch_size"] = (
        tuple(body["all_patch_size"]),
        tuple(body["all_f_patch_size"]),
    )
    return body


def release_config(version: str, transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The full `ZImageControlNetModel` config for a release plugged into this transformer."""
    config = {**CONTROL_CONFIGS[version], **body_of(transformer_config)}
    if config["control_refiner_layers_places"] is not None:
        # One control refiner block per noise-refiner layer (diffusers builds n_refiner_layers of them),
        # each feeding the layer of its index: [0, 1] on Z-Image-Turbo's 2, fewer on a smaller model.
        config["control_refiner_layers_places"] = [
            place for place in config["control_refiner_layers_places"] if place < config["n_refiner_layers"]
        ]
    return config
