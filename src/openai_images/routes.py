"""The edge where a job picks its dialect: `{"openai_route", "openai_input"}` speaks OpenAI's
Images API, anything else is the native API and goes to the worker unchanged.

Runpod's gateway turns `POST /v2/<endpoint>/openai/v1/<route>` into a job with that input
and returns the job's output as the HTTP body (worker-vllm serves chat completions this way).
An OpenAI job runs the same job flow as a native one: its body becomes the one typed request
(src/openai_images/bodies.py), and the output or the error comes back in OpenAI's shapes
(src/openai_images/replies.py). A failed job's `error` is OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from src.jobs.worker import Worker
from src.openai_images.bodies import ROUTES, BadBody, native_input, shown_key
from src.openai_images.masks import native_mask
from src.openai_images.replies import error_object, images_response, models_list
from src.runtime.errors import JobError

log = logging.getLogger(__name__)
MODELS_ROUTE = "/v1/models"
SERVED_ROUTES = (*ROUTES, MODELS_ROUTE)
JOB_KEYS = ("openai_route", "openai_input")


@dataclass
class OpenAIImages:
    """The SDK's handler for both dialects, over one worker."""

    worker: Worker
    # `created` of every model in /v1/models: when this worker started serving them.
    started: int = field(default_factory=lambda: int(time.time()))

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        raw = job.get("input")
        if not (isinstance(raw, dict) and "openai_route" in raw):
            return await self.worker.handle(job)
        job_id = str(job.get("id", "local"))
        try:
            route = self._route(raw)
            log.info("job %s: OpenAI %s", job_id, route)
            if route == MODELS_ROUTE:
                return models_list(list(self.worker.models), self.started)
            native, fields = native_input(route, raw.get("openai_input"))
            if "mask" in native:  # fetched once here, and read in OpenAI's convention
                native["mask"] = await asyncio.get_running_loop().run_in_executor(
                    None, native_mask, native["mask"]
                )
        except BadBody as err:
            log.info("job %s failed: %s", job_id, err)
            return {"error": error_object(str(err), err.param)}
        except JobError as err:
            log.info("job %s failed: %s", job_id, err)
            return {"error": error_object(str(err))}
        except Exception:
            log.exception("job %s: unexpected error", job_id)
            message = f"internal error in job {job_id}; the worker logged the details and keeps serving"
            return {"error": error_object(message)}
        response_format = fields.response_format or "url"
        output = await self.worker.handle({**job, "input": native}, inline=response_format == "b64_json")
        if "error" in output:
            return self._failed(output)
        return images_response(output, response_format)

    @staticmethod
    def _route(raw: dict[str, Any]) -> str:
        unknown = [key for key in raw if key not in JOB_KEYS]
        if unknown:
            raise BadBody(
                f"{shown_key(unknown[0])}: unknown field; an OpenAI job's input holds only "
                f"{' and '.join(JOB_KEYS)}",
                unknown[0][:40],
            )
        route = raw["openai_route"]
        if not isinstance(route, str) or route.rstrip("/") not in SERVED_ROUTES:
            shown = repr(route[:60]) if isinstance(route, str) else type(route).__name__
            raise BadBody(
                f"openai_route: {shown} is not served: this worker serves {', '.join(SERVED_ROUTES)}",
                "openai_route",
            )
        return route.rstrip("/")

    @staticmethod
    def _failed(output: dict[str, Any]) -> dict[str, Any]:
        """A native failure in OpenAI's shape; `refresh_worker` is kept for the SDK."""
        reply: dict[str, Any] = {"error": error_object(output["error"])}
        if output.get("refresh_worker"):
            reply["refresh_worker"] = True
        return reply
