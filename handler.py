"""Z-Image Turbo as a Runpod serverless worker.

    python handler.py                                   # runs test_input.json once
    python handler.py --test_input '{"input": {...}}'   # runs one job and exits
    python handler.py --rp_serve_api --rp_api_port 8000 # local /runsync, /run, /status

Deployed, this file is the container's command: the weights load once, before the
first job is taken, then the Runpod SDK's job loop (src/jobs/job_loop.py) keeps up to
MAX_CONCURRENCY jobs in flight. A job whose input carries `openai_route` speaks OpenAI's Images
API (src/openai_images/). The work lives in src/ (see docs/architecture.md).
"""

import time

STARTED = time.perf_counter()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from src.runtime.cpu_probe import without_cpu_probe  # noqa: E402

# The SDK probes the CPU with a subprocess when it is first imported (~1.1 s): answer it here.
with without_cpu_probe():
    import runpod  # noqa: E402, F401

from src.jobs.job_loop import serve  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.model.files import ModelNotFound  # noqa: E402
from src.model.safety import SafetyModelError  # noqa: E402
from src.openai_images.routes import OpenAIImages  # noqa: E402
from src.runtime.logs import add_secret, configure_logging  # noqa: E402
from src.runtime.settings import Settings, SettingsError  # noqa: E402

log = logging.getLogger("src.handler")


def main() -> None:
    configure_logging()
    log.info("imports took %.0f ms", (time.perf_counter() - STARTED) * 1000)
    try:
        settings = Settings.from_env(os.environ)
        add_secret(settings.bucket_access_key_id)
        add_secret(settings.bucket_secret_access_key)
        worker = Worker.start(settings)
    except (SettingsError, ModelNotFound, SafetyModelError) as err:
        log.error("cannot start: %s", err)
        sys.exit(1)
    log.info("cold start: %.0f ms from process start to taking jobs", (time.perf_counter() - STARTED) * 1000)
    # Jobs with `openai_route` speak OpenAI's Images API (docs/openai.md); the rest are native.
    serve(
        OpenAIImages(worker).handle,
        settings.max_concurrency,
        stop_taking_jobs=lambda: worker.gpu.faulted,
        delivery=worker.delivery,
    )


if __name__ == "__main__":
    main()
