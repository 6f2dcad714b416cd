"""The one error type for failures a caller can act on, and the one error shape."""

from __future__ import annotations


class JobError(Exception):
    """An expected failure: bad input, an unreachable image, flagged content, storage down.

    Its message goes to the caller as it is, so it must name the field, say what arrived
    and what is allowed, and never carry a secret, a signature or a traceback.
    """


def error_output(message: str) -> dict[str, str]:
    """The only shape a failed job returns; the platform reports it as FAILED."""
    return {"error": message}
