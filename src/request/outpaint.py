"""`outpaint` (API.md, "Outpainting"): the margins of new canvas around `image`, and what they change
of the request's defaults. src/inputs/canvas.py builds the canvas and its mask from them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from src.request.sizes import AUTO

# What `outpaint` changes of the defaults (with `image`): the canvas's size, and margins made from
# scratch (below 1 they start from the input's edge pixels stretched outward).
OUTPAINT_DEFAULTS = {"size": AUTO, "strength": 1.0}
MAX_MARGIN, MAX_FEATHER = 2048, 256
MARGIN_RULE = (
    f"an integer from 0 to {MAX_MARGIN}: pixels of new canvas on that side, in the input's own pixels"
)


class Outpaint(BaseModel):
    """The margins, in the input's own pixels, and how deep into the input the seam blends."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    left: int = Field(default=0, ge=0, le=MAX_MARGIN, description=MARGIN_RULE)
    right: int = Field(default=0, ge=0, le=MAX_MARGIN, description=MARGIN_RULE)
    top: int = Field(default=0, ge=0, le=MAX_MARGIN, description=MARGIN_RULE)
    bottom: int = Field(default=0, ge=0, le=MAX_MARGIN, description=MARGIN_RULE)
    feather: int = Field(
        default=0,
        ge=0,
        le=MAX_FEATHER,
        description=f"an integer from 0 to {MAX_FEATHER}: how deep into the input the seam blends",
    )

    @model_validator(mode="after")
    def _some_margin(self) -> Outpaint:
        if not any((self.left, self.right, self.top, self.bottom)):
            raise ValueError(
                "outpaint: no side has a margin: give at least one of left, right, top, bottom "
                f"an integer from 1 to {MAX_MARGIN}, or leave 'outpaint' out"
            )
        return self

    def canvas(self, width: int, height: int) -> tuple[int, int]:
        """The size of a `width` x `height` input with the margins added."""
        return width + self.left + self.right, height + self.top + self.bottom
