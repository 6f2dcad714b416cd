"""Z-Image Turbo as a Runpod serverless worker.

    python handler.py                                   # runs test_input.json once
    python handler.py --test_input '{"input": {...}}'   # runs one job and exits
    python handler.py --rp_serve_api --rp_api_port 8000 # local /runsync, /run, /status
    ENDPOINT_TYPE=lb PORT=8000 python handler.py        # a load-balancing endpoint's HTTP server

Deployed, this file is the container's command: the start's fitness checks run (settings, model
files, GPU, disk: src/jobs/fitness.py; a failure is reported to Runpod as an unhealthy worker),
the weights load once, before the first job is taken, then the Runpod SDK's job loop
(src/jobs/job_loop.py) keeps up to MAX_CONCURRENCY jobs in flight. A job whose input carries
`openai_route` speaks OpenAI's Images API (src/openai_images/). With ENDPOINT_TYPE=lb the same
worker is instead an HTTP server that clients reach directly (src/lb/, docs/load-balancing.md).
The work lives in src/ (see docs/architecture.md).
"""

import gc
import time

STARTED = time.perf_counter()
# Python's cyclic GC would walk the imports' half a million objects over and over while they are
# made: about 0.9 s of a 4 s import on a 2-core CPU (benchmarks/cost/imports.py). It is paused
# until they are in, and then they are frozen: they live as long as the process, so no later
# collection (each one holds the GIL, stalling the GPU stage's thread) needs to walk them again.
gc.disable()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from src.runtime.sdk_import import lean_sdk_import  # noqa: E402

# Without the SDK's import-time CPU probe (~1.1 s) and its SSH commands (~50 ms): see the module.
with lean_sdk_import():
    import runpod  # noqa: E402, F401

from src.jobs.fitness import EXPECTED, Start  # noqa: E402
from src.jobs.job_loop import runs_fitness_checks, serve  # noqa: E402
from src.openai_images.routes import OpenAIImages  # noqa: E402
from src.runtime.logs import configure_logging  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402

gc.freeze()
gc.enable()

log = logging.getLogger("src.handler")


def main() -> None:
    configure_logging()
    log.info("imports took %.0f ms", (time.perf_counter() - STARTED) * 1000)
    # Jobs with `openai_route` speak OpenAI's Images API (docs/openai.md); the rest are native.
    start = Start(os.environ, OpenAIImages, STARTED)  # settings, model files, GPU, disk, weights
    if start.config is not None and start.config.endpoint_type == "lb":
        serve_load_balanced(start, start.config)  # listens first, loads meanwhile; does not return
    if runs_fitness_checks():
        start.register()  # deployed: the SDK's fitness phase runs the parts and reports a failure
    elif not start.run():  # locally: the same parts, here; a failure is printed
        sys.exit(1)
    serve(start.handle, start.loaded)


def serve_load_balanced(start: Start, settings: Settings) -> None:
    """ENDPOINT_TYPE=lb: the HTTP server. Imported only here: the queue worker's cold start skips
    uvicorn and Starlette (tests/test_cold_start.py). A start that fails is logged, /ping answers
    503 and the process exits 1 (no SDK job loop, so no fitness phase)."""
    from src.lb.server import serve_http

    sys.exit(serve_http(settings, start.load, EXPECTED))


if __name__ == "__main__":
    main()
