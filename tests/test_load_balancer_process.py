"""`ENDPOINT_TYPE=lb python handler.py`, as a load-balancing endpoint runs it: one process on the tiny
model, reached over loopback by the openai SDK; then stopped with SIGTERM in the middle of a job.

The SDK's start-up checks are off (RUNPOD_SKIP_AUTO_SYSTEM_CHECKS, RUNPOD_SKIP_GPU_CHECK), as in
the other process tests, so nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from tests.conftest import ROOT, LocalAPI, free_port, worker_env
from tests.load_balancer import post_in_background, wait_until

START_SECONDS = 120  # imports and the tiny model's load, on a busy 2-core machine
SLOW = {
    "prompt": "a long job",
    "size": "512x512",
    "n": 2,
    "num_inference_steps": 4,
    "response_format": "b64_json",
}


def lb_process(env: dict[str, str], log_path: Path) -> LocalAPI:
    """`ENDPOINT_TYPE=lb python handler.py` on a free port; the caller waits for `/ping`."""
    port = free_port()
    lb_env = {**env, "ENDPOINT_TYPE": "lb", "PORT": str(port)}
    return LocalAPI(lb_env, log_path, command=lambda _: [sys.executable, "handler.py"], ready=None, port=port)


def ping(process: LocalAPI) -> int | None:
    try:
        return requests.get(f"{process.url}/ping", timeout=5).status_code
    except requests.ConnectionError:
        return None


def env_of(tiny_model: Path, **extra: str) -> dict[str, str]:
    return worker_env(
        tiny_model, RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true", RUNPOD_SKIP_GPU_CHECK="true", **extra
    )


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory) -> Iterator[tuple[LocalAPI, list[int]]]:
    """The process, and every /ping status seen until it was ready (it listens before loading)."""
    process = lb_process(env_of(tiny_model), tmp_path_factory.mktemp("lb") / "lb.log")
    seen: list[int] = []

    def ready() -> bool:
        if process.process.poll() is not None:
            raise RuntimeError(f"exited with {process.process.returncode}:\n{process.log()}")
        status = ping(process)
        if status is not None:
            seen.append(status)
        return status == 200

    wait_until(ready, "the worker to be ready", START_SECONDS)
    yield process, seen
    process.close(seconds=60)


def test_it_listens_while_loading_and_serves_the_openai_sdk(served):
    process, seen = served
    assert set(seen) <= {204, 200} and seen[-1] == 200
    client = openai.OpenAI(base_url=f"{process.url}/v1", api_key="unused", max_retries=0)
    reply = client.images.generate(
        prompt="a boat", size="256x256", response_format="b64_json", extra_body={"seed": 3}
    )
    native = requests.post(
        f"{process.url}/runsync",
        json={"input": {"prompt": "a boat", "size": "256*256", "seed": 3}},
        timeout=120,
    ).json()
    assert reply.data[0].b64_json == native["output"]["image_url"].split(",", 1)[1]
    assert "listening on port" in process.log()


def test_sigterm_mid_job_answers_it_and_exits_0(served):
    process, _ = served
    answers: list[requests.Response] = []
    started = len(process.log())
    sender = post_in_background(f"{process.url}/v1/images/generations", SLOW, answers)
    # The job has begun once the worker logs it (after parsing, before the GPU stage).
    wait_until(lambda: "z-image-turbo, text-to-image" in process.log()[started:], "the job to begin")
    process.process.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping: 1 request(s) in flight" in process.log(), "the stop to begin")
    assert ping(process) in (503, None)  # 503 while draining (None: it had already finished)
    sender.join(timeout=300)
    assert process.process.wait(timeout=60) == 0, process.log()[-3000:]
    assert [answer.status_code for answer in answers] == [200] and len(answers[0].json()["data"]) == 2


def test_a_bad_setting_or_a_missing_model_stops_it_naming_why(tiny_model, tmp_path):
    bad = subprocess.run(
        [sys.executable, "handler.py"],
        cwd=ROOT,
        env={**env_of(tiny_model), "ENDPOINT_TYPE": "lb", "PORT": "99999"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "PORT: '99999' is not allowed" in bad.stdout + bad.stderr
    missing = lb_process(env_of(tmp_path / "absent"), tmp_path / "missing.log")
    assert missing.process.wait(timeout=120) == 1
    assert "listening on port" in missing.log() and "cannot start" in missing.log()
    missing.close()


def test_try_cpu_saves_the_pictures_and_prints_their_paths(tiny_model, tmp_path):
    # scripts/try-cpu.sh sets up, builds the tiny model, then runs this with its arguments.
    job = {"input": {"prompt": "a fox", "size": "256*256", "num_images": 2, "output_format": "webp"}}
    done = subprocess.run(
        [sys.executable, "scripts/try_cpu.py", "--test_input", json.dumps(job), "--out", str(tmp_path)],
        cwd=ROOT,
        env=env_of(tiny_model),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    paths = [
        Path(line.removeprefix("saved ")) for line in done.stdout.splitlines() if line.startswith("saved ")
    ]
    assert len(paths) == 2 and all(path.parent == tmp_path for path in paths)
    assert [Image.open(path).size for path in paths] == [(256, 256)] * 2
    assert Image.open(paths[0]).format == "WEBP"
