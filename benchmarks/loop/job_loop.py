"""The deployed loop's throughput: jobs/s and how busy the GPU stage is, with a backlog.

    python benchmarks/loop/job_loop.py            # every variant; writes benchmarks/results/job_loop.md
    python benchmarks/loop/job_loop.py --quick    # this worker's loop at MAX_CONCURRENCY 2 only
    python benchmarks/loop/job_loop.py --timeline docs/throughput-timeline.svg --jobs 8
                                             # one backlog of image-to-image jobs, drawn (timeline.py)

`python handler.py` runs as deployed, against the loopback stand-in for Runpod's queue in
tests/loopback_servers.py, with a backlog of 512*512 jobs (and of 1024*1024 jobs for the
wrapper's overhead). The yardstick, measured in the same run: diffusers' own pipeline called
back to back in a fresh process (benchmarks/loop/bare_diffusers.py); `vs_bare` is jobs/s over its
jobs/s at the same size. Each variant is one of:
- loop: this worker's (src/jobs/job_loop.py) or the SDK's stock `JobScaler`
  (benchmarks/loop/stock_worker.py), both with the same async handler;
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
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# The cyclic GC paused while torch and diffusers import (as handler.py does): it would walk their
# half a million new objects again and again, about a fifth of the import time.
gc.disable()
from benchmarks import results_file  # noqa: E402
from benchmarks.loop import timeline  # noqa: E402
from builder.tiny_model import build_tiny_zimage  # noqa: E402
from tests.conftest import ImageServer, Route, end_process, png_bytes, worker_env  # noqa: E402
from tests.loopback_servers import BUCKET, KEY_ID, SECRET, JobQueue, MotoServer, StoreProxy  # noqa: E402

gc.enable()

GPU_STAGES = ("encode_prompt", "denoise", "decode", "safety")
SCRIPTS = {"this worker's": "handler.py", "SDK stock": "benchmarks/loop/stock_worker.py"}
UPLOAD_DELAY_S = 0.2
# The timeline's jobs: small and few steps, so that on a loaded CPU the "GPU" stage stays near the
# length of a fetch and an upload and all five bars can be seen; the input host is slowed like a distant one.
TIMELINE_SIZE, TIMELINE_STEPS, FETCH_S = "256*256", 4, 0.3


def bare(model: Path, size: str, jobs: int) -> dict:
    """diffusers alone, back to back, in its own process: a row with this file's columns."""
    done = subprocess.run(
        [sys.executable, "benchmarks/loop/bare_diffusers.py", "--model", str(model), "--size", size,
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


def run_backlog(
    model: Path,
    loop: str,
    concurrency: int,
    store_url: str | None,
    jobs: int,
    logs: Path,
    size: str,
    extra: dict | None = None,
) -> JobQueue:
    """The backlog through `python handler.py` (or the stock loop); the queue holds what happened."""
    extra = extra or {}
    backlog = [
        {
            "id": f"bench-{i}",
            "input": {"prompt": f"a harbour at dawn, take {i}", "size": size, "seed": i, **extra},
        }
        for i in range(jobs)
    ]
    queue = JobQueue(backlog)
    env = worker_env(model, **queue.env(), MAX_CONCURRENCY=str(concurrency))
    if "image" in extra:  # the image host is on loopback, which the SDK's downloader refuses by default
        env["RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"] = "1"
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
    return queue


def measure(
    model: Path, loop: str, concurrency: int, store_url: str | None, jobs: int, logs: Path, size: str
) -> dict:
    queue = run_backlog(model, loop, concurrency, store_url, jobs, logs, size)
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


def draw_timeline(model: Path, jobs: int, logs: Path, out: Path) -> None:
    """One backlog as deployed, drawn: two slots, image-to-image from a slow host, a slow store."""
    store, images = MotoServer(), ImageServer()
    store.make_bucket()
    proxy = StoreProxy(store.port)
    proxy.delay = UPLOAD_DELAY_S
    picture = png_bytes((256, 256))
    images.routes["/in.png"] = Route(picture, delay=FETCH_S / -(-len(picture) // 1024))  # per 1 KiB chunk
    load = results_file.load_average()
    try:
        extra = {"image": f"{images.url}/in.png", "strength": 0.8, "num_inference_steps": TIMELINE_STEPS}
        queue = run_backlog(model, "this worker's", 2, proxy.url, jobs, logs, TIMELINE_SIZE, extra)
    finally:
        proxy.close()
        store.stop()
        images.close()
    t0 = min(queue.taken.values())
    order = sorted(queue.taken, key=queue.taken.get)
    rows = {
        f"job {i}": timeline.spans(queue.results[job]["output"]["timings"], queue.finished[job] - t0)
        for i, job in enumerate(order)
    }
    taken = {f"job {i}": queue.taken[job] - t0 for i, job in enumerate(order)}
    caption = [
        f"this worker's loop, MAX_CONCURRENCY 2, {jobs} image-to-image jobs of {TIMELINE_SIZE}, "
        f"{TIMELINE_STEPS} steps, tiny random model; input from a loopback host slowed to "
        f"{FETCH_S * 1000:.0f} ms,",
        f"S3 (moto) behind a proxy holding each response {UPLOAD_DELAY_S * 1000:.0f} ms. Drawn on a shared "
        f"{os.cpu_count()}-core CPU (load average {load:.1f}), {datetime.now(UTC):%Y-%m-%d}:",
        "it shows the overlap, not the speed. Bars from each job's own timings, ending when its result "
        "reached the queue.",
    ]
    title = "A backlog on one worker: the next job fetches and the last one uploads while one is on the GPU"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(timeline.draw(rows, taken, title, caption))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="this worker's loop, MAX_CONCURRENCY 2, data URIs"
    )
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/job_loop.md")
    parser.add_argument("--model", type=Path, help="a model folder (default: a tiny random one)")
    parser.add_argument("--timeline", type=Path, help="draw one backlog as an SVG here instead")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="zimage-loop-") as tmp:
        model = args.model or build_tiny_zimage(Path(tmp) / "tiny-zimage")
        if args.timeline:
            draw_timeline(model, args.jobs, Path(tmp), args.timeline)
            return
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

    facts = [
        f"model: {args.model or 'tiny random model (CPU)'}; {args.jobs} jobs of 512*512 "
        f"({args.jobs // 2} of 1024*1024), 8 steps, PNG"
    ]
    header = results_file.header("The deployed loop with a backlog", facts)
    results_file.write(args.out, [*header, "", *results_file.table(rows)])
    print("\n".join(results_file.table(rows)))


if __name__ == "__main__":
    main()
