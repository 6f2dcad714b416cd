"""`parse_request`: the one reader of a job's `input`, and the messages of what it refuses.

Every problem names its field, shows what arrived (short: a 5 MB string is not echoed back, a
LoRA URL loses its query) and says what is allowed; up to five problems go in one message.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from src.lora.files import shown_path
from src.request.outpaint import Outpaint
from src.request.schema import FIELDS, GenerateRequest, LoraSpec
from src.request.seed_variance import SeedVariance
from src.request.upscale import Upscale
from src.runtime.errors import JobError

MAX_PROBLEMS = 5
# The object fields whose errors are named `<field>.<key>`.
OBJECTS: dict[str, type[BaseModel]] = {
    "outpaint": Outpaint,
    "upscale": Upscale,
    "seed_variance": SeedVariance,
}


def parse_request(raw: Any) -> GenerateRequest:
    """Validate a job's `input`; every problem becomes one `JobError` naming its fields."""
    if not isinstance(raw, dict):
        raise JobError(f"input: {shown(raw)} is not allowed: it must be a JSON object with at least 'prompt'")
    try:
        return GenerateRequest.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        # The allowed fields are listed once, in the first unknown field's clause.
        unknown = [i for i, error in enumerate(errors) if error["type"] == "extra_forbidden"]
        first = unknown[0] if unknown else -1
        clauses = [_describe(error, raw, listed=i == first) for i, error in enumerate(errors[:MAX_PROBLEMS])]
        raise JobError(joined(clauses, len(errors))) from None


def joined(problems: list[str], total: int) -> str:
    """The first MAX_PROBLEMS of `total` problems as one message, and how many more there were."""
    clauses = problems[:MAX_PROBLEMS]
    if total > MAX_PROBLEMS:
        clauses.append(f"and {total - MAX_PROBLEMS} more problem(s)")
    return "; ".join(clauses)


def unknown_field(
    key: str,
    allowed: list[str] | tuple[str, ...],
    listed: bool = True,
    show: Callable[[str], str] | None = None,
) -> str:
    """An unknown key's clause: the key as `show` shows it, the nearest allowed name, and, when
    `listed` (once per message, so five unknown keys do not repeat a list of forty), every allowed one."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    every = f"{' ' if close else '; '}allowed fields: {', '.join(allowed)}" if listed else ""
    return f"{(show or shown_key)(key)}: unknown field{hint}{every}"


def _describe(error: Any, raw: dict, listed: bool = True) -> str:
    """One pydantic error -> 'field: what arrived is not allowed: what is allowed'."""
    field = str(error["loc"][0]) if error["loc"] else ""
    if field == "loras" and len(error["loc"]) > 1:
        return _describe_lora(error, raw)
    if field in OBJECTS and (len(error["loc"]) > 1 or error["type"] == "value_error"):
        return _describe_part(error, field, raw[field], OBJECTS[field])
    if error["type"] == "extra_forbidden":
        return unknown_field(field, list(FIELDS), listed)
    if error["type"] == "missing":
        return f"{field}: required; send {FIELDS[field].description}"
    if not field:  # a rule across fields (model validator)
        return str(error["ctx"]["error"])
    return f"{field}: {shown(raw.get(field))} is not allowed: it must be {FIELDS[field].description}"


def _describe_lora(error: Any, raw: dict) -> str:
    """An error inside `loras[i]`, named `loras[i].<key>`; a URL is shown without its query (tokens)."""
    index = error["loc"][1]
    entry = raw["loras"][index]
    if len(error["loc"]) == 2 and error["type"] != "value_error":
        rule = "it must be an object {'path': ..., 'scale': ...}"
        return f"loras[{index}]: {shown(entry)} is not allowed: {rule}"
    return _describe_part({**error, "loc": error["loc"][1:]}, f"loras[{index}]", entry, LoraSpec)


def _describe_part(error: Any, name: str, entry: dict, model: type[BaseModel]) -> str:
    """An error inside an object field (OBJECTS, an entry of `loras`), named `<name>.<key>`."""
    key = str(error["loc"][1]) if len(error["loc"]) > 1 else ""
    if error["type"] == "extra_forbidden":
        return f"{name}.{shown_key(key)}: unknown field; allowed fields: {', '.join(model.model_fields)}"
    if not key:  # the object's own rule (model validator): its message names the field
        return str(error["ctx"]["error"])
    spec = model.model_fields[key]
    if error["type"] == "missing":
        return f"{name}.{key}: required; send {spec.description}"
    value = entry.get(key)
    arrived = shown_path(value) if key == "path" and isinstance(value, str) else shown(value)
    reason = (
        str(error["ctx"]["error"]) if error["type"] == "value_error" else f"it must be {spec.description}"
    )
    return f"{name}.{key}: {arrived} is not allowed: {reason}"


def shown_key(name: str) -> str:
    """An unknown key as the message shows it: as sent when short and plain, else quoted and cut,
    so a 5 MB key is not echoed back and a key with a newline cannot forge a log line."""
    if re.fullmatch(r"[\w.-]{1,40}", name, flags=re.ASCII):
        return name
    return repr(name[:40]) + ("..." if len(name) > 40 else "")


def shown(value: Any) -> str:
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
