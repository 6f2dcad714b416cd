"""Both models in the deployed path: `python handler.py` in the Runpod SDK's job loop, with
ZIMAGE_BASE_MODEL set, against the loopback job queue (tests/loopback_servers.py).

A backlog that alternates Turbo and the base, served two at a time, gives every job the output
it gets when the same jobs are served one model at a time, one job at a time.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.loopback_servers import JobQueue
from tests.test_job_loop import START_SECONDS, deployed, in_flight
from tests.test_two_models import base_model  # noqa: F401

PRICES = {"z-image-turbo": 0.005, "z-image": 0.01}


def mixed_jobs() -> list[dict]:
    """8 jobs alternating the models; each pair shares prompt and seed, so only the model differs."""
    jobs = []
    for i in range(8):
        fields: dict = {
            "prompt": f"a tram in the rain, take {i // 2}",
            "size": "256*256",
            "seed": 100 + i // 2,
            "num_inference_steps": 2 + i // 2 % 2,  # 2, 2, 3, 3, 2, 2, 3, 3
        }
        if i % 2:
            fields["model"] = "z-image"
        if i == 5:
            fields["num_images"] = 2
        elif i == 6:
            fields["model"] = "z-image-turbo"  # the default, named
        jobs.append({"id": f"mixed-{i}", "input": fields})
    return jobs


def model_of(job: dict) -> str:
    return job["input"].get("model", "z-image-turbo")


def serve(jobs: list[dict], tiny_model: Path, base: Path, log: Path, concurrency: str) -> JobQueue:
    queue = JobQueue(jobs)
    ids = [job["id"] for job in jobs]
    try:
        with deployed(queue, tiny_model, log, MAX_CONCURRENCY=concurrency, ZIMAGE_BASE_MODEL=str(base)):
            assert queue.wait_for(ids, START_SECONDS + 120), log.read_text()[-3000:]
            time.sleep(0.5)  # would anything more be posted?
    finally:
        queue.close()
    assert queue.backlog == [] and set(queue.results) == set(ids), log.read_text()[-3000:]
    assert "z-image from" in log.read_text()  # the base was loaded (src/model/family.py logs it)
    return queue


def test_a_mixed_backlog_two_at_a_time_equals_one_model_at_a_time(tiny_model, base_model, tmp_path):  # noqa: F811
    jobs = mixed_jobs()
    two = serve(jobs, tiny_model, base_model, tmp_path / "two.log", "2")
    by_model = sorted(jobs, key=lambda job: list(PRICES).index(model_of(job)))  # stable: Turbo, then base
    one = serve(by_model, tiny_model, base_model, tmp_path / "one.log", "1")

    for job in jobs:
        results = [queue.results[job["id"]] for queue in (two, one)]
        for result in results:
            assert "error" not in result and "output" in result, result
            output = result["output"]
            images = job["input"].get("num_images", 1)
            assert output["model"] == model_of(job)
            assert output["cost"] == round(PRICES[model_of(job)] * images, 6)
            assert len(output.get("images", [output])) == images
        a, b = ({k: v for k, v in r["output"].items() if k != "timings"} for r in results)
        assert a == b, job["id"]
    # Same prompt and seed on the two models: two pictures, so `model` really chose the weights.
    for i in range(0, 8, 2):
        assert (
            two.results[f"mixed-{i}"]["output"]["image_url"]
            != two.results[f"mixed-{i + 1}"]["output"]["image_url"]
        )
    # The slots were used, and never more jobs in flight than the slots plus as many delivering.
    assert 2 <= max(in_flight(two, t) for t in two.taken.values()) <= 4
    assert 1 <= max(in_flight(one, t) for t in one.taken.values()) <= 2
