"""Native outputs and errors -> OpenAI's response body and error object (API.md, "OpenAI Images API").

Native errors begin with the field they are about ("size: '1000x1000' is not allowed: ...");
that field, when it is one a caller sends, makes the error the caller's (`invalid_request_error`
with `param`); the safety checker's refusal is OpenAI's `content_policy_violation`; anything
else (storage down, out of memory, an internal error) is a `server_error`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from src.openai_images.bodies import EXTENSIONS, EditFields
from src.request.schema import FIELDS

# Fields a caller sends: the native ones, OpenAI's, the extensions (some may be newer than this
# worker's native request, which then refuses them by name), the job input's own two, and the
# job's bucket beside the input.
CALLER_FIELDS = (
    frozenset(FIELDS)
    | frozenset(EditFields.model_fields)
    | frozenset(EXTENSIONS)
    | {"openai_route", "openai_input", "s3Config"}
)
LEADING_FIELD = re.compile(r"([A-Za-z_][\w-]{0,39})((?:\[\d+\])?(?:\.\w+)?): ")
OWNER = "tongyi-mai"


def error_object(message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for a native error message (or for the adapter's own, with its `param`)."""
    if param is not None:
        return _error(message, "invalid_request_error", param, None)
    match = LEADING_FIELD.match(message)
    if match is None:
        return _error(message, "server_error", None, None)
    field = match[1]
    if field == "safety":
        return _error(message, "invalid_request_error", None, "content_policy_violation")
    if field == "output":  # the response would be too big: the caller's size, format or n
        return _error(message, "invalid_request_error", None, None)
    if field in CALLER_FIELDS:
        return _error(message, "invalid_request_error", field + match[2], None)
    return _error(message, "server_error", None, None)


def _error(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": param, "code": code}


def images_response(output: dict[str, Any], response_format: str) -> dict[str, Any]:
    """The native output of a job as OpenAI's images response; `b64_json` needs data URIs."""
    urls = [entry["image_url"] for entry in output.get("images", [output])]
    if response_format == "b64_json":
        data: list[dict[str, Any]] = [{"b64_json": url.split(",", 1)[1]} for url in urls]
    else:
        data = [{"url": url} for url in urls]
    if "expanded_prompt" in output:  # the text the images were made from
        for entry in data:
            entry["revised_prompt"] = output["expanded_prompt"]
    return {
        "created": int(time.time()),
        "data": data,
        "model": output["model"],
        "size": f"{output['width']}x{output['height']}",
        "output_format": output["output_format"],
        "seed": output["seed"],
        "cost": output["cost"],
        "timings": output["timings"],
        "has_nsfw_concepts": output["has_nsfw_concepts"],
    }


def models_list(names: list[str], created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": OWNER} for name in names],
    }
