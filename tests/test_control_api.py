"""Control through `python handler.py` as deployed: the local API with a URL control image, the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Route, data_uri_of, decode_data_uri, local_api, worker_env
from tests.test_local_api import run_cli
from tests.tiny_controlnets import build_tiny_depth, save_controlnet


@pytest.fixture(scope="module")
def control_env(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("control-api")
    _, release = save_controlnet(tiny_model, "2.1", root / "cn")
    depth = build_tiny_depth(root / "depth")
    return worker_env(tiny_model, CONTROLNET_MODEL=str(release), DEPTH_MODEL=str(depth))


def edges_png() -> bytes:
    picture = np.zeros((300, 400, 3), dtype=np.uint8)
    picture[60:240, 100:300] = 255
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def test_local_api_serves_control_from_a_url(control_env, image_server, tmp_path):
    image_server.routes["/edges.png"] = Route(edges_png(), headers={"Content-Type": "image/png"})
    job = {
        "prompt": "a glass house",
        "control_image": f"{image_server.url}/edges.png",
        "control_preprocess": "canny",
        "size": "512*256",
        "num_inference_steps": 2,
        "seed": 9,
    }
    env = {**control_env, "RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS": "1"}  # the image server is on loopback
    with local_api(env, tmp_path / "api.log") as server:
        reply = server.runsync(job)
        assert reply["status"] == "COMPLETED", reply
        output = reply["output"]
        assert decode_data_uri(output["image_url"]).size == (512, 256)
        assert output["timings"]["preprocess_control"] > 0
        depth = server.runsync({**job, "control_preprocess": "depth"})
        assert depth["status"] == "COMPLETED", depth
        assert depth["output"]["image_url"] != output["image_url"]
        refused = server.runsync({**job, "image": data_uri_of(edges_png())})
        assert refused["status"] == "FAILED" and refused["error"].startswith("control_image: is not allowed")
    assert ("GET", "/edges.png", b"") in image_server.received


def test_test_input_runs_a_control_job(control_env):
    job = {"input": {"prompt": "a tower", "control_image": data_uri_of(edges_png()), "size": "256*256"}}
    done = run_cli(control_env, "--test_input", json.dumps(job))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "completed successfully" in done.stdout


def test_a_worker_without_a_controlnet_fails_the_control_job_by_name(api):
    # conftest's shared local API: the tiny model, started without a ControlNet.
    reply = api.runsync({"prompt": "a tower", "control_image": data_uri_of(edges_png()), "size": "256*256"})
    assert reply["status"] == "FAILED"
    assert reply["error"].startswith(
        "control_image: this worker has no ControlNet (started with CONTROLNET_MODEL=none)"
    )


def test_a_missing_controlnet_stops_the_start(tiny_model, tmp_path):
    env = worker_env(tiny_model, CONTROLNET_MODEL=str(tmp_path / "nowhere.safetensors"))
    done = run_cli(env, "--test_input", json.dumps({"input": {"prompt": "a"}}))
    assert done.returncode != 0
    assert f"CONTROLNET_MODEL: no file at {tmp_path / 'nowhere.safetensors'}" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
