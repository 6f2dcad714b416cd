"""The models this API serves, one row each: the request's name, its step and guidance defaults,
its step limit, and which settings hold its weights and its price.

The request fills the fields a job leaves out from its model's row (schema.py); the worker loads
the rows whose weights setting is not "none" and prices a job from its row. Adding a model is a
row here and its two settings; the job flow does not change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelCard:
    name: str  # the request's `model`
    weights_setting: str  # the environment variable that names its weights (Settings field below)
    settings_field: str  # the Settings attribute holding that value
    price_field: str  # the Settings attribute holding its price per image
    default_steps: int
    max_steps: int
    default_guidance: float
    about: str


MODELS: dict[str, ModelCard] = {
    "z-image-turbo": ModelCard(
        name="z-image-turbo",
        weights_setting="ZIMAGE_MODEL",
        settings_field="model",
        price_field="price_per_image_usd",
        default_steps=8,
        max_steps=50,
        default_guidance=0.0,  # distilled for no guidance
        about="Z-Image-Turbo, 8 steps, no guidance",
    ),
    "z-image": ModelCard(
        name="z-image",
        weights_setting="ZIMAGE_BASE_MODEL",
        settings_field="base_model",
        price_field="base_price_per_image_usd",
        default_steps=50,
        max_steps=100,
        default_guidance=4.0,  # the undistilled base: full classifier-free guidance
        about="Z-Image, the undistilled base: 50 steps with guidance and negative prompts",
    ),
}
DEFAULT_MODEL = "z-image-turbo"
MAX_STEPS = max(card.max_steps for card in MODELS.values())
