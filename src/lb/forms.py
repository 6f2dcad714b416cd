"""`multipart/form-data` bodies, as OpenAI's SDKs send `/v1/images/edits` -> the JSON body they stand for.

Files become bare base64 (`image` or `image[]`, `mask`, any other picture field) and go to the
one picture loader as a JSON body's would; nothing is written to disk. Text fields take the type
their field declares (src/openai_images/bodies.py, src/request/schema.py): digits are numbers,
`true`/`false` booleans, `loras` and the objects (`outpaint`, `seed_variance`) JSON; anything else
stays text, so the adapter's and the native request's own checks judge every value and name the
field, as for JSON bodies.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import AsyncIterator
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from src.lb.limits import MAX_BODY
from src.openai_images.bodies import EditFields
from src.request.schema import FIELDS

MAX_PARTS = 100  # a body with more parts than every field twice over is refused by the parser
NESTED = re.compile(r"(\w{1,64})(\[\])?\[(\w{1,64})\]", re.ASCII)  # outpaint[left], loras[][path]
INTEGER = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


class BadForm(Exception):
    """A body that is not readable as multipart/form-data; the message says why."""


def is_form(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


async def form_body(headers: Headers, body: bytes) -> dict[str, Any]:
    """The JSON body a multipart form stands for."""

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        headers, once(), max_files=MAX_PARTS, max_fields=MAX_PARTS, max_part_size=MAX_BODY
    )
    parser.spool_max_size = MAX_BODY  # the body is already in memory (capped): no temporary file on disk
    try:
        form = await parser.parse()
    except (MultiPartException, ValueError) as err:
        raise BadForm(f"the multipart/form-data body cannot be read: {err}") from None
    values: dict[str, list[Any]] = {}
    nested: dict[str, Any] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")  # `image[]`: the SDKs' name for a list of files
        if isinstance(value, UploadFile):
            values.setdefault(name, []).append(base64.b64encode(await value.read()).decode("ascii"))
            await value.close()
        elif (part := NESTED.fullmatch(key)) is not None:
            _nest(nested, *part.groups(), value)
        else:
            values.setdefault(name, []).append(typed(name, value))
    flat = {name: found[0] if len(found) == 1 else found for name, found in values.items()}
    return {**nested, **flat}  # a field sent both ways: the plain one, which its check judges


def _nest(nested: dict[str, Any], name: str, listed: str | None, key: str, text: str) -> None:
    """The openai SDKs' form encoding of objects: `outpaint[left]=64` is `{"left": 64}`, and
    `loras[][path]=a&loras[][scale]=1&loras[][path]=b` a list whose entry ends when a key repeats."""
    value = typed(key, text, _object_fields(name))
    if not listed:
        target = nested.setdefault(name, {})
        if isinstance(target, dict):
            target[key] = value
        return
    entries = nested.setdefault(name, [])
    if isinstance(entries, list):
        if not entries or key in entries[-1]:
            entries.append({})
        entries[-1][key] = value


def typed(name: str, text: str, fields: dict[str, Any] | None = None) -> Any:
    """A form field's text as its declared type, when it reads as one; else the text itself."""
    declared = (
        (fields or {}).get(name)
        if fields is not None
        else EditFields.model_fields.get(name) or FIELDS.get(name)
    )
    kinds = _kinds(declared.annotation) if declared is not None else {str}
    if bool in kinds and text in ("true", "false"):
        return text == "true"
    if int in kinds and INTEGER.fullmatch(text):
        return int(text)
    if float in kinds and NUMBER.fullmatch(text) and math.isfinite(float(text)):
        return float(text)
    if kinds & {list, dict}:
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _object_fields(name: str) -> dict[str, Any]:
    """The fields of the object (or list of objects) that the request field `name` declares."""
    declared = FIELDS.get(name)
    stack = [declared.annotation] if declared is not None else []
    while stack:
        annotation = stack.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation.model_fields
        stack.extend(get_args(annotation))
    return {}


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits: `int | None` -> {int, NoneType}, `list[X]` -> {list}."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {type(value) for value in get_args(annotation)}
    if origin is Annotated:
        return _kinds(get_args(annotation)[0])
    if origin in (Union, UnionType):
        return set().union(*(_kinds(arg) for arg in get_args(annotation)))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {dict}  # an object field (`outpaint`): JSON text, as `loras`
    return {origin or annotation}
