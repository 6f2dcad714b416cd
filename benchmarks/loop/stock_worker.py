"""`handler.py` in the Runpod SDK's stock job loop, for comparison (benchmarks/loop/job_loop.py).

The same async handler and `concurrency_modifier`, without src/jobs/job_loop.py's scaler: what
`runpod.serverless.start` alone does with this worker.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import runpod  # noqa: E402

import handler  # noqa: E402


def stock_serve(handle, max_concurrency: int, stop_taking_jobs, delivery=None) -> None:
    # The SDK's own slot count: every job in flight holds one, delivering or not.
    runpod.serverless.start({"handler": handle, "concurrency_modifier": lambda current: max_concurrency})


if __name__ == "__main__":
    handler.serve = stock_serve
    handler.main()
