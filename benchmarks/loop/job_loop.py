"""The deployed loop's throughput: jobs/s and how busy the GPU stage is, with a backlog.

    python benchmarks/job_loop.py            # every variant; writes benchmarks/results/job_loop.md
    python benchmarks/job_loop.py --quick    # this worker's loop at MAX_CONCURRENCY 2 only

`python handler.py` runs as deployed, against the loopback stand-in for Runpod's queue in
tests/loopback_servers.py, with a backlog of 512*512 jobs (and of 1024*1024 jobs for the
wrapper's overhead). The yardstick, measured in the same run: diffusers' own pipeline called
back to back in a fresh process (benchmarks/bare_diffusers.py); `vs_bare` is jobs/s over its
jobs/s at the same size. Each variant is one of:
- loop: this worker's (src/jobs/job_loop.py) or the SDK's stock `JobScaler`
  (benchmarks/stock_loop_worker.py), both with the same async handler;
- MAX_CONCURRENCY 1 or 2;
- delivery: data URIs, or a loopback S3 store (moto) behind a proxy that holds every
  response back 200 ms, like a distant bucket.

job latency = from a job taken to its result posted (what a caller waits on top of the queue).
busy = the sum of the jobs' GPU stages (encode_prompt, denoise, decode, safety, from their
own `timings`) over the wall time from the first job taken to the last result received.
On a CPU the "GPU" stage shares the cores with encoding and uploads, so its stages run
slower when they overlap; jobs/s is the figure that counts there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.tiny_model import build_tiny_zimage  # noqa: E402
from tests.conftest import end_process, worker_env  # noqa: E402
from tests.loopback_servers import BUCKET, KEY_ID, SECRET, JobQueue, MotoServer, StoreProxy  # noqa: E402

GPU_STAGES = ("encode_prompt", "denoise", "decode", "safety")
SCRIPTS = {"this worker's": "handler.py", "SDK stock": "benchmarks/stock_loop_worker.py"}
UPLOAD_DELAY_S = 0.2


def bare(model: Path, size: str, jobs: int) -> dict:
    """diffusers alone, back to back, in its own process: a row with this file's columns."""
    done = subprocess.run(
        [sys.executable, "benchmarks/bare_diffusers.py", "--model", str(model), "--size", size,
         "--jobs", str(jobs)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "loop": "bare diffusers",
        "size": size,
        "max_concurrency": 1,
        "delivery": "PIL image, not encoded",
        "jobs": jobs,
        "wall_s": round(measured["wall_s"], 2),
        "jobs_per_s": round(measured["jobs_per_s"], 2),
        "vs_bare": 1.0,
        "gpu_busy_pct": "",
        "job_latency_median_s": round(measured["wall_s"] / jobs, 2),
    }


def measure(
    model: Path, loop: str, concurrency: int, store_url: str | None, jobs: int, logs: Path, size: str
) -> dict:
    backlog = [
        {
            "id": f"bench-{i}",
            "input": {"prompt": f"a harbour at dawn, take {i}", "size": size, "seed": i},
        }
        for i in range(jobs)
    ]
    queue = JobQueue(backlog)
    env = worker_env(model, **queue.env(), MAX_CONCURRENCY=str(concurrency))
    if store_url:
        env.update(
            BUCKET_ENDPOINT_URL=store_url,
            BUCKET_ACCESS_KEY_ID=KEY_ID,
            BUCKET_SECRET_ACCESS_KEY=SECRET,
            BUCKET_NAME=BUCKET,
        )
    log = logs / f"{loop.split()[0]}-{concurrency}-{'store' if store_url else 'uri'}-{size[:4]}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, SCRIPTS[loop]], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            done = queue.wait_for([job["id"] for job in backlog], 300)
        finally:
            end_process(process, seconds=60)
            queue.close()
    if not done:
        raise RuntimeError(f"{loop} loop, {concurrency} slot(s): not every job finished; see {log}")
    failed = [job_id for job_id, result in queue.results.items() if "output" not in result]
    if failed:
        raise RuntimeError(f"jobs failed: {failed}; see {log}")
    wall = max(queue.finished.values()) - min(queue.taken.values())
    busy = sum(sum(r["output"]["timings"][k] for k in GPU_STAGES) for r in queue.results.values()) / 1000
    return {
        "loop": loop,
        "size": size,
        "max_concurrency": concurrency,
        "delivery": f"S3, +{UPLOAD_DELAY_S * 1000:.0f} ms a request" if store_url else "data URI",
        "jobs": jobs,
        "wall_s": round(wall, 2),
        "jobs_per_s": round(jobs / wall, 2),
        "vs_bare": "",
        "gpu_busy_pct": round(100 * busy / wall, 1),
        # From taken to result: with 2 slots a job also waits for the one ahead of it on the GPU.
        "job_latency_median_s": round(
            statistics.median(queue.finished[j] - queue.taken[j] for j in queue.taken), 2
        ),
    }


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="this worker's loop, MAX_CONCURRENCY 2, data URIs"
    )
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/job_loop.md")
    parser.add_argument("--model", type=Path, help="a model folder (default: a tiny random one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="zimage-loop-") as tmp:
        model = args.model or build_tiny_zimage(Path(tmp) / "tiny-zimage")
        variants = [("this worker's", 2, None, "512*512")]
        store = proxy = None
        if not args.quick:  # --quick needs no S3 server (moto is a test dependency only)
            store = MotoServer()
            store.make_bucket()
            proxy = StoreProxy(store.port)
            proxy.delay = UPLOAD_DELAY_S
            variants = [
                (loop, concurrency, url, "512*512")
                for url in (None, proxy.url)
                for loop in SCRIPTS
                for concurrency in (1, 2)
            ]
            # The wrapper's overhead where a job is long enough for it to be a share: 1024*1024.
            variants += [("this worker's", concurrency, None, "1024*1024") for concurrency in (1, 2)]
        sizes = sorted({size for *_, size in variants}, key=len)
        rows, yardstick = [], {}
        try:
            for size in sizes:
                rows.append(bare(model, size, args.jobs if size == "512*512" else args.jobs // 2))
                yardstick[size] = rows[-1]["jobs_per_s"]
                print(json.dumps(rows[-1]), flush=True)
            for loop, concurrency, url, size in variants:
                jobs = args.jobs if size == "512*512" else args.jobs // 2
                row = measure(model, loop, concurrency, url, jobs, Path(tmp), size)
                row["vs_bare"] = round(row["jobs_per_s"] / yardstick[size], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if store is not None:
                proxy.close()
                store.stop()

    header = [
        "# The deployed loop with a backlog",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}",
        f"- model: {args.model or 'tiny random model (CPU)'}; {args.jobs} jobs of 512*512 "
        f"({args.jobs // 2} of 1024*1024), 8 steps, PNG",
        "- command: `python benchmarks/job_loop.py" + (" --quick`" if args.quick else "`"),
        "",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(header) + markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
