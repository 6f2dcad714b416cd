"""OpenAI request bodies (`/v1/images/generations`, `/v1/images/edits`) -> the native job input.

Each OpenAI field is declared once below, with its default and rule. Fields that the native
request has under the same name (`prompt`, `model`, `output_format`, the extensions the OpenAI
SDKs send through `extra_body`) pass through unchanged, so the native schema stays their one
judge; the fields OpenAI names differently (`n`, `output_compression`) or that only OpenAI has
(`response_format`, `quality`, ...) are checked here, with OpenAI's names in every message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from src.request.parse import joined, shown, unknown_field  # a body with a thousand bad keys: a few clauses
from src.runtime.errors import JobError

# Native fields without an OpenAI equivalent, accepted as they are (API.md, "OpenAI Images API").
EXTENSIONS = (
    "seed",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "enable_safety_checker",
    "loras",
    "acceleration",
    "enable_prompt_expansion",
    "control_image",
    "control_preprocess",
    "control_scale",
    "control_start",
    "control_end",
    "seed_variance",
)
# OpenAI fields that are native fields too, under the same name and rule.
SHARED = ("prompt", "model", "output_format")
QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd")


class BadBody(JobError):
    """A body this adapter refuses; `param` is the field OpenAI's error object names (the first one)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class GenerationFields(BaseModel):
    """The OpenAI-only fields of `/v1/images/generations`; null means "left out", as at OpenAI."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    n: int | None = Field(default=None, ge=1, le=4, description="an integer from 1 to 4 (default 1)")
    size: str | None = Field(
        default=None,
        description="'WxH' with width and height multiples of 16 in 256..2048, or 'auto' (default "
        "'1024x1024')",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None, description="'url' (the default) or 'b64_json'"
    )
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="an integer from 0 to 100 (jpeg and webp quality)"
    )
    # Accepted for the OpenAI SDKs and tools that always send them; they change nothing here.
    quality: Literal[QUALITIES] | None = Field(  # type: ignore[valid-type]
        default=None, description="one of " + ", ".join(QUALITIES) + " (it has no effect here)"
    )
    style: Literal["vivid", "natural"] | None = Field(
        default=None, description="'vivid' or 'natural' (it has no effect here)"
    )
    user: str | None = Field(default=None, description="a string (it has no effect here)")
    moderation: Literal["auto", "low"] | None = Field(
        default=None, description="'auto' or 'low' (it has no effect here; see enable_safety_checker)"
    )
    background: str | None = Field(default=None, description="'auto' or 'opaque' (it has no effect here)")
    stream: bool | None = Field(default=None, description="false (streaming is not supported)")

    @field_validator("background")
    @classmethod
    def _opaque(cls, background: str) -> str:
        if background == "transparent":
            raise ValueError(
                "background: 'transparent' is not supported: Z-Image makes opaque pictures; "
                "send 'auto' or 'opaque', or leave 'background' out"
            )
        if background not in ("auto", "opaque"):
            raise ValueError(f"background: {shown(background)} is not allowed: it must be 'auto' or 'opaque'")
        return background

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, stream: bool) -> bool:
        if stream:
            raise ValueError(
                "stream: true is not supported: this worker returns finished images only; "
                "leave 'stream' out or send false"
            )
        return stream


class EditFields(GenerationFields):
    """`/v1/images/edits` with a JSON body: the generation fields, the picture and its mask."""

    image: str | list[str] = Field(
        description="an http(s) URL, a data:image/...;base64, URI or bare base64 of the picture to "
        "edit, or a list holding one"
    )
    mask: str | None = Field(
        default=None,
        min_length=1,
        description="an http(s) URL, a data:image/...;base64, URI or bare base64 of a mask the size "
        "of 'image' (transparent = regenerate, opaque = keep; without alpha, white = regenerate)",
    )

    @field_validator("image")
    @classmethod
    def _one_image(cls, image: str | list[str]) -> str | list[str]:
        if isinstance(image, list) and len(image) != 1:
            raise ValueError(
                f"image: a list of {len(image)} pictures is not allowed: this worker edits one "
                "picture; send it alone or as a list holding one"
            )
        return image


# What each route's body may hold; `strength` is native, with its own default under a mask, and
# `outpaint` and `upscale` extend or enlarge the edited picture (generations have none).
ROUTES: dict[str, tuple[type[GenerationFields], tuple[str, ...]]] = {
    "/v1/images/generations": (GenerationFields, SHARED + EXTENSIONS),
    "/v1/images/edits": (EditFields, SHARED + ("strength", "outpaint", "upscale") + EXTENSIONS),
}


def native_input(route: str, body: Any) -> tuple[dict[str, Any], GenerationFields]:
    """The native job input for an OpenAI body, and the OpenAI-only fields (the reply needs
    `response_format`). Every problem becomes one BadBody naming its fields."""
    if not isinstance(body, dict):
        raise BadBody(
            f"openai_input: {shown(body)} is not allowed: the request body must be a JSON object "
            "with at least 'prompt'",
            "openai_input",
        )
    model, passed = ROUTES[route]
    allowed = tuple(dict.fromkeys(("prompt", *model.model_fields, *passed)))
    # (field, message) for every problem, unknown keys first.
    # The allowed fields are listed once, in the first unknown key's clause.
    unknown = [key for key in body if key not in allowed]
    problems = [(key, unknown_field(key, allowed, i == 0, shown_key)) for i, key in enumerate(unknown)]
    fields: GenerationFields | None = None
    try:
        fields = model.model_validate(body)
    except ValidationError as err:
        problems += [(str(e["loc"][0]) if e["loc"] else "", _describe(e, body, model)) for e in err.errors()]
    if problems or fields is None:
        raise BadBody(
            joined([message for _, message in problems], len(problems)), problems[0][0][:40] or None
        )

    native = {key: body[key] for key in passed if key in body}
    if fields.n is not None:
        native["num_images"] = fields.n
    if fields.output_compression is not None:
        native["output_quality"] = max(1, fields.output_compression)  # OpenAI's 0 is native 1
    size = fields.size if fields.size not in (None, "auto") else None
    if isinstance(fields, EditFields):
        image = fields.image
        native["image"] = image[0] if isinstance(image, list) else image
        native["size"] = size or "auto"  # the input picture's own size (API.md, "Sizes: auto")
        if fields.mask is not None:
            native["mask"] = fields.mask  # still OpenAI's convention: src/openai_images/masks.py
            if "strength" not in body and "control_image" not in body:
                native["strength"] = 1.0  # OpenAI regenerates the masked area from scratch
    else:
        native["size"] = size or "1024x1024"
    return native, fields


def shown_key(key: str) -> str:
    """A key as a message shows it: as sent when short and printable, else quoted and cut, so a
    5 MB key is not echoed back and a key with a newline cannot forge a log line."""
    return key if len(key) <= 40 and key.isprintable() else repr(key[:40]) + "..."


def _describe(error: Any, body: dict, model: type[GenerationFields]) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "missing":
        return f"{field}: required; send {model.model_fields[field].description}"
    if error["type"] == "value_error":  # the validators above say it whole
        return str(error["ctx"]["error"])
    rule = model.model_fields[field].description
    return f"{field}: {shown(body.get(field))} is not allowed: it must be {rule}"
