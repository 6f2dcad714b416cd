"""The request: every input of API.md declared once, with its type, default and bounds.

`parse_request(raw)` is the only reader of `job["input"]`; everything below the handler
receives a `GenerateRequest`. Types are strict: "1024" is not 1024, 1.5 is not 1, and a
bool is neither a number nor an integer.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from src.lora.files import LORA_PATH_RULE, MAX_LORAS, check_lora_path, shown_path
from src.request.models import DEFAULT_MODEL, MAX_STEPS, MODELS
from src.request.sizes import AUTO, AUTO_SOURCES, SIZE_RULE, parse_size
from src.request.sizes import MAX_SIDE as MAX_SIDE
from src.request.sizes import MIN_SIDE as MIN_SIDE
from src.request.sizes import PRESET_SIZES as PRESET_SIZES
from src.request.sizes import SIDE_STEP as SIDE_STEP
from src.runtime.errors import JobError

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
# The `acceleration` levels: none is the plain pipeline; the others reuse work between steps.
ACCELERATION_LEVELS = ("none", "regular", "high")
FORMAT_ALIASES = {"jpg": "jpeg"}
# A body with a thousand bad keys is answered in a few clauses, not a thousand.
MAX_PROBLEMS = 5


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
        return {"num_inference_steps": card.default_steps, "guidance_scale": card.default_guidance, **raw}

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
            if name in self.model_fields_set and self.control_image is None:
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

    def with_size(self, width: int, height: int) -> GenerateRequest:
        """The same request at a resolved size (`auto` once its picture is open)."""
        return self.model_copy(update={"size": f"{width}*{height}"})

    @property
    def width(self) -> int:
        """Only for a resolved size: `auto` is replaced (with_size) before anything asks."""
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]


FIELDS = GenerateRequest.model_fields


def parse_request(raw: Any) -> GenerateRequest:
    """Validate a job's `input`; every problem becomes one `JobError` naming its fields."""
    if not isinstance(raw, dict):
        raise JobError(
            f"input: {_shown(raw)} is not allowed: it must be a JSON object with at least 'prompt'"
        )
    try:
        return GenerateRequest.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        problems = [_describe(error, raw) for error in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            problems.append(f"and {len(errors) - MAX_PROBLEMS} more problem(s)")
        raise JobError("; ".join(problems)) from None


def _describe(error: Any, raw: dict) -> str:
    """One pydantic error -> 'field: what arrived is not allowed: what is allowed'."""
    field = str(error["loc"][0]) if error["loc"] else ""
    if field == "loras" and len(error["loc"]) > 1:
        return _describe_lora(error, raw)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, FIELDS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{_key(field)}: unknown field; {hint}allowed fields: {', '.join(FIELDS)}"
    if error["type"] == "missing":
        return f"{field}: required; send {FIELDS[field].description}"
    if not field:  # a rule across fields (model validator)
        return str(error["ctx"]["error"])
    shown = _shown(raw.get(field))
    return f"{field}: {shown} is not allowed: it must be {FIELDS[field].description}"


def _describe_lora(error: Any, raw: dict) -> str:
    """An error inside `loras[i]`, named `loras[i].<key>`; a URL is shown without its query (tokens)."""
    index, key = error["loc"][1], (str(error["loc"][2]) if len(error["loc"]) > 2 else "")
    entry = raw["loras"][index]
    name = f"loras[{index}]"
    if error["type"] == "extra_forbidden":
        return f"{name}.{_key(key)}: unknown field; allowed fields: {', '.join(LoraSpec.model_fields)}"
    if not key:
        return f"{name}: {_shown(entry)} is not allowed: it must be an object {{'path': ..., 'scale': ...}}"
    spec = LoraSpec.model_fields[key]
    if error["type"] == "missing":
        return f"{name}.{key}: required; send {spec.description}"
    value = entry.get(key)
    shown = shown_path(value) if key == "path" and isinstance(value, str) else _shown(value)
    reason = (
        str(error["ctx"]["error"]) if error["type"] == "value_error" else f"it must be {spec.description}"
    )
    return f"{name}.{key}: {shown} is not allowed: {reason}"


def _key(name: str) -> str:
    """An unknown key as the message shows it: as sent when short and plain, else quoted and cut,
    so a 5 MB key is not echoed back and a key with a newline cannot forge a log line."""
    if re.fullmatch(r"[\w.-]{1,40}", name, flags=re.ASCII):
        return name
    return repr(name[:40]) + ("..." if len(name) > 40 else "")


def _shown(value: Any) -> str:
    """What arrived, short enough for a message (a 5 MB string is not echoed back)."""
    if isinstance(value, str):
        if len(value) > 60:
            return f"a string of {len(value)} characters"
        return repr(value) if value.strip() else f"a blank string {value!r}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return repr(value) + (" (a number)" if isinstance(value, float) else "")
    kind = {dict: "an object", list: "a list"}.get(type(value), type(value).__name__)
    return kind
