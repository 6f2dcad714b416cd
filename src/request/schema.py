"""The request: every input of API.md declared once, with its type, default and bounds.

`parse_request(raw)` (src/request/parse.py) is the only reader of `job["input"]`; everything
below the handler receives a `GenerateRequest`. Types are strict: "1024" is not 1024, 1.5 is not 1, and a
bool is neither a number nor an integer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from src.lora.files import LORA_PATH_RULE, MAX_LORAS, check_lora_path, shown_path
from src.request.models import DEFAULT_MODEL, MAX_STEPS, MODELS
from src.request.outpaint import OUTPAINT_DEFAULTS, Outpaint
from src.request.seed_variance import SeedVariance
from src.request.sizes import AUTO, AUTO_SOURCES, SIZE_RULE, auto_size, parse_size, resolved_size
from src.request.sizes import MAX_SIDE as MAX_SIDE
from src.request.sizes import MIN_SIDE as MIN_SIDE
from src.request.sizes import PRESET_SIZES as PRESET_SIZES
from src.request.sizes import SIDE_STEP as SIDE_STEP
from src.request.upscale import UPSCALE_DEFAULTS, Upscale, blank_upscale_prompt, check_upscale

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
# The `acceleration` levels: none is the plain pipeline; the others reuse work between steps.
ACCELERATION_LEVELS = ("none", "regular", "high")
FORMAT_ALIASES = {"jpg": "jpeg"}
# A body with a thousand bad keys is answered in a few clauses, not a thousand.


def _format_name(value: Any) -> Any:
    """Case-insensitive formats, with `jpg` as another name for `jpeg`."""
    if isinstance(value, str):
        value = value.strip().lower()
        return FORMAT_ALIASES.get(value, value)
    return value


class LoraSpec(BaseModel):
    """One entry of `loras` (API.md, "LoRA adapters")."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    path: str = Field(description=LORA_PATH_RULE)
    scale: float = Field(
        default=1.0, ge=-4.0, le=4.0, allow_inf_nan=False, description="a number from -4.0 to 4.0"
    )

    @field_validator("path")
    @classmethod
    def _path_allowed(cls, path: str) -> str:
        return check_lora_path(path)


class GenerateRequest(BaseModel):
    """The `input` object of a job (API.md, "Request")."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(
        max_length=MAX_PROMPT_CHARS,
        description=f"a non-blank string of at most {MAX_PROMPT_CHARS} characters (English or Chinese)",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        description="an http(s) URL, a data:image/...;base64, URI or bare base64 of the input image",
    )
    mask: str | None = Field(
        default=None,
        min_length=1,
        description="an http(s) URL, a data:image/...;base64, URI or bare base64 of a mask the size of "
        "'image' (white = regenerate, black = keep)",
    )
    size: str = Field(
        default="1024*1024",
        description=f"{SIZE_RULE}, or '{AUTO}' (the size of 'image', else of 'control_image')",
    )
    strength: float = Field(
        default=0.8,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 1.0 (with 'image' only; 0.0 returns the input untouched)",
    )
    seed: int = Field(
        default=-1, ge=-1, le=MAX_SEED, description=f"an integer from -1 (random) to {MAX_SEED}"
    )
    output_format: Annotated[Literal["png", "jpeg", "webp"], BeforeValidator(_format_name)] = Field(
        default="png", description="one of png, jpeg (or jpg), webp"
    )
    enable_safety_checker: bool = Field(default=True, description="a boolean, true or false (not a string)")
    num_images: int = Field(default=1, ge=1, le=4, description="an integer from 1 to 4")
    # Defaults per model (src/request/models.py), filled in by `_model_defaults` when left out.
    num_inference_steps: int = Field(
        default=MODELS[DEFAULT_MODEL].default_steps,
        ge=1,
        le=MAX_STEPS,
        description="an integer from 1 to "
        + " or ".join(f"{card.max_steps} ({name})" for name, card in MODELS.items()),
    )
    guidance_scale: float = Field(
        default=MODELS[DEFAULT_MODEL].default_guidance,
        ge=0.0,
        le=20.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 20.0",
    )
    negative_prompt: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description=f"a string of at most {MAX_PROMPT_CHARS} characters, used when guidance_scale > 0",
    )
    output_quality: int = Field(default=95, ge=1, le=100, description="an integer from 1 to 100")
    loras: list[LoraSpec] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description=f'a list of 0 to {MAX_LORAS} objects {{"path": ..., "scale": ...}}',
    )
    control_image: str | None = Field(
        default=None,
        min_length=1,
        description="an http(s) URL, a data:image/...;base64, URI or bare base64 of a control map (or, "
        "with 'control_preprocess', of a picture to make one from)",
    )
    control_preprocess: Literal["none", "canny", "depth", "pose"] = Field(
        default="none", description="one of none, canny, depth, pose (with 'control_image' only)"
    )
    control_scale: float = Field(
        default=0.75,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 2.0 (with 'control_image' only)",
    )
    # Step i of n (from 0) runs the ControlNet when control_start <= i/n < control_end
    # (src/model/control_window.py); 0.0 and 1.0 are every step, the plain control pipeline.
    control_start: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 1.0, the fraction of the steps before control begins "
        "(with 'control_image' only)",
    )
    control_end: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="a number from 0.0 to 1.0, greater than control_start: the fraction of the steps "
        "after which control stops (with 'control_image' only)",
    )

    model: Literal[tuple(MODELS)] = Field(  # type: ignore[valid-type]
        default=DEFAULT_MODEL, description="one of " + ", ".join(MODELS)
    )
    # How much transformer work is reused between steps; what each level does per model is
    # src/model/acceleration.py's table.
    acceleration: Literal[ACCELERATION_LEVELS] = Field(  # type: ignore[valid-type]
        default="none", description="one of " + ", ".join(ACCELERATION_LEVELS)
    )
    # The canvas and mask are built where inputs are fitted (src/inputs/canvas.py); the inpainting
    # pipeline does the rest (src/model/modes.py's "outpainting" row).
    outpaint: Outpaint | None = Field(
        default=None,
        description='an object {"left", "right", "top", "bottom", "feather"} of integers '
        "(with 'image' only)",
    )
    # Noise on the prompt's embeddings, seeded per image, in the first steps (src/model/seed_variance.py).
    seed_variance: SeedVariance | None = Field(
        default=None, description='an object {"strength", "fraction", "until"} of numbers'
    )
    # The resample is made where inputs are fitted (src/inputs/pictures.py); the "upscaling" row of
    # src/model/modes.py refines it in tiles.
    upscale: Upscale | None = Field(
        default=None,
        description="an object {\"factor\"}, a number over 1.0 and at most 4.0 (with 'image' only)",
    )
    # Rewritten by the worker's language model before encoding (src/model/expander.py).
    enable_prompt_expansion: bool = Field(
        default=False, description="a boolean, true or false (not a string)"
    )

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, raw: Any) -> Any:
        """The fields a job leaves out that differ per model, from its model's row."""
        name = raw.get("model", DEFAULT_MODEL) if isinstance(raw, dict) else None
        card = MODELS.get(name) if isinstance(name, str) else None
        if card is None:  # not an object, or an unknown model: the field's own error says so
            return raw
        defaults = {"num_inference_steps": card.default_steps, "guidance_scale": card.default_guidance}
        if raw.get("outpaint") is not None and raw.get("image") is not None:
            # Outpainting: the canvas decides the size, and the margins are made from scratch.
            defaults.update(OUTPAINT_DEFAULTS)
        if raw.get("upscale") is not None and raw.get("image") is not None:
            # Upscaling: the factor decides the size, a light refine, the Tile ControlNet's scale.
            defaults.update(UPSCALE_DEFAULTS)
        return {**defaults, **raw}

    @model_validator(mode="after")
    def _steps_within_the_model(self) -> GenerateRequest:
        card = MODELS[self.model]
        if self.num_inference_steps > card.max_steps:
            others = ", ".join(f"{c.max_steps} for {n}" for n, c in MODELS.items() if n != self.model)
            raise ValueError(
                f"num_inference_steps: {self.num_inference_steps} is not allowed: it must be an integer "
                f"from 1 to {card.max_steps} for {self.model} (up to {others})"
            )
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _upscale_may_leave_the_prompt_out(cls, raw: Any, handler: Any) -> GenerateRequest:
        """With `upscale` and `image`, an absent or blank prompt is allowed: it stays blank here and
        the worker refines with UPSCALE_PROMPT (`with_prompt`). Everywhere else blank is a mistake."""
        blank = blank_upscale_prompt(raw)
        if blank is None:
            return handler(raw)
        return handler({**raw, "prompt": "-"}).model_copy(update={"prompt": blank})

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("blank")
        return prompt

    @field_validator("size")
    @classmethod
    def _size_allowed(cls, size: str) -> str:
        if size != AUTO:
            parse_size(size)
        return size

    @model_validator(mode="after")
    def _auto_needs_a_picture(self) -> GenerateRequest:
        if self.size == AUTO and self.auto_source is None:
            raise ValueError(
                "size: 'auto' takes the size of 'image' or 'control_image', and this request has neither: "
                "send 'W*H' (e.g. '1024*1024'), or leave 'size' out for 1024*1024"
            )
        return self

    @model_validator(mode="after")
    def _outpaint_needs_image_alone(self) -> GenerateRequest:
        if self.outpaint is None:
            return self
        if self.image is None:
            raise ValueError(
                "outpaint: needs 'image', the picture to extend: send 'image' with it, "
                "or leave 'outpaint' out"
            )
        refusals = {
            "mask": "the margins are its mask; leave 'mask' out, or 'outpaint' out to inpaint",
            "control_image": "outpainting takes no control map; leave 'control_image' out",
        }
        for other, why in refusals.items():
            if getattr(self, other) is not None:
                raise ValueError(f"outpaint: is not allowed together with '{other}': {why}")
        if self.size != AUTO:
            raise ValueError(
                f"size: {self.size!r} is not allowed with 'outpaint': the output size is the canvas's "
                f"(the input with its margins) under size '{AUTO}'; leave 'size' out or send '{AUTO}'"
            )
        return self

    @model_validator(mode="after")
    def _upscale_needs_image_alone(self) -> GenerateRequest:
        if self.upscale is not None:
            check_upscale(self)
        return self

    @model_validator(mode="after")
    def _strength_needs_image(self) -> GenerateRequest:
        if "strength" in self.model_fields_set and self.image is None:
            raise ValueError(
                "strength: only applies to image-to-image: send 'image' with it, or leave 'strength' out"
            )
        return self

    @model_validator(mode="after")
    def _mask_needs_image(self) -> GenerateRequest:
        if self.mask is not None and self.image is None:
            raise ValueError(
                "mask: needs 'image', the picture to inpaint: send 'image' with it, or leave 'mask' out"
            )
        return self

    @model_validator(mode="after")
    def _control_fields_need_control_image(self) -> GenerateRequest:
        for name in ("control_preprocess", "control_scale", "control_start", "control_end"):
            # With `upscale`, control_scale is the Tile ControlNet's.
            tile_scale = name == "control_scale" and self.upscale is not None
            if name in self.model_fields_set and self.control_image is None and not tile_scale:
                raise ValueError(
                    f"{name}: only applies with 'control_image': send 'control_image' with it, "
                    f"or leave '{name}' out"
                )
        return self

    @model_validator(mode="after")
    def _control_window_not_empty(self) -> GenerateRequest:
        if self.control_end <= self.control_start:
            raise ValueError(
                f"control_end: {self.control_end!r} is not allowed: it must be greater than control_start "
                f"({self.control_start!r}): control runs on the steps i of n with start <= i/n < end"
            )
        return self

    @model_validator(mode="after")
    def _control_has_a_mode(self) -> GenerateRequest:
        # The ControlNet pipelines make text-to-image and inpainting; image-to-image has none.
        if self.control_image is not None and self.image is not None and self.mask is None:
            raise ValueError(
                "control_image: is not allowed with 'image' alone (image-to-image has no control): "
                "send 'mask' too to inpaint with control, or leave 'image' out for text-to-image with control"
            )
        # ZImageControlNetInpaintPipeline starts from noise: there is no strength to set.
        if self.control_image is not None and "strength" in self.model_fields_set:
            raise ValueError(
                "strength: does not apply to inpainting with control (it regenerates the masked area "
                "from noise): leave 'strength' out"
            )
        return self

    @model_validator(mode="after")
    def _loras_distinct(self) -> GenerateRequest:
        paths = [lora.path for lora in self.loras]
        for i, path in enumerate(paths):
            if path in paths[:i]:
                raise ValueError(
                    f"loras[{i}].path: {shown_path(path)} is not allowed: it is the same LoRA as "
                    f"loras[{paths.index(path)}]; give each LoRA once, with the sum of the scales"
                )
        return self

    @property
    def auto_source(self) -> str | None:
        """The picture field whose size `size: "auto"` takes (None: the request has no picture)."""
        return next((name for name in AUTO_SOURCES if getattr(self, name) is not None), None)

    def with_auto_size(self, picture: tuple[int, int]) -> GenerateRequest:
        """The same request at the size `auto` makes of the picture it takes, once that is open:
        of the canvas, with `outpaint`, which is the picture with its margins."""
        if self.upscale is not None:  # the input times the factor (may refuse, naming upscale.factor)
            return self.with_size(*self.upscale.output(*picture))
        canvas = self.outpaint.canvas(*picture) if self.outpaint is not None else picture
        return self.with_size(*auto_size(*canvas))

    def with_prompt(self, fallback: str) -> GenerateRequest:
        """The same request, with `fallback` where the prompt is blank (only upscaling allows that)."""
        return self if self.prompt.strip() else self.model_copy(update={"prompt": fallback})

    def with_size(self, width: int, height: int) -> GenerateRequest:
        """The same request at a resolved size (`auto` once its picture is open)."""
        return self.model_copy(update={"size": f"{width}*{height}"})

    @property
    def width(self) -> int:
        """Only for a resolved size: `auto` is replaced (with_size) before anything asks. An
        upscale's size is past the `size` field's bounds (up to 4096 a side), checked by its factor."""
        return resolved_size(self.size)[0]

    @property
    def height(self) -> int:
        return resolved_size(self.size)[1]


FIELDS = GenerateRequest.model_fields
