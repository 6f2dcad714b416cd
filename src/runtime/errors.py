"""The one error type for failures a caller can act on, and the one error shape."""

from __future__ import annotations


class JobError(Exception):
    """An expected failure: bad input, an unreachable image, flagged content, storage down.

    Its message goes to the caller as it is, so it must name the field, say what arrived
    and what is allowed, and never carry a secret, a signature or a traceback.
    """


def error_output(message: str, refresh_worker: bool = False) -> dict[str, object]:
    """The only shape a failed job returns; the platform reports it as FAILED.

    `refresh_worker` asks Runpod to replace this worker after the job (the SDK turns it
    into `stopPod`), for failures that would otherwise fail every later job too.
    """
    if refresh_worker:
        return {"error": message, "refresh_worker": True}
    return {"error": message}
