"""`seed_variance` (API.md, "Seed variety"): seeded noise on the prompt's embeddings in the first steps.

The community's fix for Turbo's look-alike seeds (ComfyUI's SeedVarianceEnhancer, InvokeAI's Seed
Variance Enhancer); src/model/seed_variance.py computes the noise and switches back to the clean
embeddings. Here: the three numbers, their bounds and defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SeedVariance(BaseModel):
    """How much noise, on how many of the embeddings' values, for how many of the steps."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    strength: float = Field(
        ge=0.0,
        le=4.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 4.0: the noise's size, in standard deviations of the "
        "prompt's embeddings",
    )
    fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 1.0: the share of the embeddings' values that get noise",
    )
    until: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 1.0: step i of n uses the noisy embeddings while i/n < until",
    )

    @property
    def active(self) -> bool:
        """Whether it changes anything: with any of the three at 0 the request is the plain one."""
        return self.strength > 0 and self.fraction > 0 and self.until > 0
