"""The worker as users run it: `handler.py` as a subprocess, driven over HTTP and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import requests

from tests.conftest import ROOT, Route, decode_data_uri, local_api, png_bytes, worker_env


def run_cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "handler.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------- local API
def test_runsync_text_to_image(api):
    reply = api.runsync(
        {"prompt": "a lighthouse at dusk", "size": "768*512", "seed": 11, "output_format": "webp"}
    )
    assert reply["status"] == "COMPLETED" and reply["id"]
    output = reply["output"]
    assert (output["width"], output["height"], output["seed"], output["cost"]) == (768, 512, 11, 0.005)
    image = decode_data_uri(output["image_url"])
    assert image.format == "WEBP" and image.size == (768, 512)


def test_image_to_image_from_a_url(tiny_model, image_server, tmp_path):
    image_server.routes["/in.png"] = Route(png_bytes((500, 400)), headers={"Content-Type": "image/png"})
    job = {
        "prompt": "make it blue",
        "image": f"{image_server.url}/in.png",
        "size": "512*512",
        "strength": 0.5,
    }
    # The image server is on loopback, which the SDK refuses unless its own switch is set.
    with local_api(
        worker_env(tiny_model, RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1"), tmp_path / "api.log"
    ) as server:
        reply = server.runsync(job)
        assert reply["status"] == "COMPLETED", reply
        assert decode_data_uri(reply["output"]["image_url"]).size == (512, 512)
    assert ("GET", "/in.png", b"") in image_server.received


def test_loopback_image_urls_are_refused_by_default(api, image_server):
    image_server.routes["/in.png"] = Route(png_bytes())
    reply = api.runsync({"prompt": "a", "image": f"{image_server.url}/in.png", "size": "512*512"})
    assert reply["status"] == "FAILED" and reply["error"].startswith("image:")
    assert "non-public address" in reply["error"] and image_server.received == []


def test_run_then_status(api):
    queued = requests.post(
        f"{api.url}/run", json={"input": {"prompt": "a kite", "size": "512*512"}}, timeout=30
    )
    assert queued.status_code == 200 and queued.json()["status"] == "IN_PROGRESS"
    job_id = queued.json()["id"]
    done = requests.post(f"{api.url}/status/{job_id}", timeout=120).json()
    assert done["id"] == job_id and done["status"] == "COMPLETED"
    assert done["output"]["image_url"].startswith("data:image/png;base64,")


def test_bad_input_fails_with_a_named_field_and_the_worker_keeps_serving(api):
    for job_input, field in [
        ({"prompt": "a", "size": "1000*1000"}, "size"),
        ({"prompt": "a", "num_images": "2"}, "num_images"),
        ({"prompt": "a", "enable_safety_checker": "false"}, "enable_safety_checker"),
        ({"prompt": "a", "sedd": 5}, "sedd"),
        ({"size": "512*512"}, "prompt"),
        ({"prompt": "a", "image": "ftp://example.com/x.png"}, "image"),
        ({"prompt": "a", "image": "http://169.254.169.254/latest/meta-data/"}, "image"),
    ]:
        reply = api.runsync(job_input)
        assert reply["status"] == "FAILED", reply
        assert reply["error"].startswith(f"{field}:"), reply["error"]
        assert "Traceback" not in reply["error"]
    assert api.runsync({"prompt": "still here", "size": "512*512"})["status"] == "COMPLETED"


def test_unknown_job_id(api):
    reply = requests.post(f"{api.url}/status/no-such-job", timeout=30).json()
    assert reply["status"] == "FAILED"


def test_logs_hold_no_image_data_and_no_full_prompt(api):
    prompt = "a very particular prompt about a zebra named Quintessa " + "lorem " * 20
    api.runsync({"prompt": prompt, "size": "512*512", "seed": 1})
    log = api.settled_log()
    assert "Quintessa" not in log
    assert re.search(r"prompt \d+ chars sha256 [0-9a-f]{12}", log)
    assert not re.search(r"[A-Za-z0-9+/]{200,}", log)  # no base64 run
    assert "DEBUG" not in log


# ------------------------------------------------------------------------- CLI
def test_test_input_flag_runs_one_job_and_exits_0(tiny_model):
    job = {"input": {"prompt": "a small boat", "size": "512*512", "seed": 3, "output_format": "jpeg"}}
    done = run_cli(worker_env(tiny_model), "--test_input", json.dumps(job))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "completed successfully" in done.stdout
    assert "data:image/jpeg;base64,<" in done.stdout  # the result is logged with its image redacted


def test_test_input_json_is_used_without_a_flag(tiny_model):
    done = run_cli(worker_env(tiny_model))
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Using test_input.json" in done.stdout
    assert "'width': 1024" in done.stdout


def test_bad_test_input_exits_1_with_the_message(tiny_model):
    done = run_cli(
        worker_env(tiny_model), "--test_input", json.dumps({"input": {"prompt": "a", "num_images": 9}})
    )
    assert done.returncode == 1
    assert "num_images: 9 is not allowed: it must be an integer from 1 to 4" in done.stdout


def test_missing_model_stops_the_worker_at_start(tmp_path):
    done = run_cli(worker_env(tmp_path / "nowhere"), "--test_input", json.dumps({"input": {"prompt": "a"}}))
    assert done.returncode != 0
    assert "ZIMAGE_MODEL: no complete model" in done.stdout and "Looked in" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_incomplete_model_names_what_is_missing(tiny_model, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.unlink()
    done = run_cli(worker_env(broken), "--test_input", json.dumps({"input": {"prompt": "a"}}))
    assert done.returncode != 0 and "transformer/*.safetensors" in done.stdout


def test_bad_setting_stops_the_worker_at_start(tiny_model):
    done = run_cli(worker_env(tiny_model, PRICE_PER_IMAGE_USD="cheap"))
    assert done.returncode != 0 and "PRICE_PER_IMAGE_USD: 'cheap' is not allowed" in done.stdout


def test_progress_updates_reach_the_platform(tiny_model, image_server):
    env = worker_env(tiny_model, RUNPOD_WEBHOOK_POST_OUTPUT=f"{image_server.url}/job-done?id=$ID")
    job = {"id": "progress-job", "input": {"prompt": "a", "size": "512*512", "num_inference_steps": 4}}
    done = run_cli(env, "--test_input", json.dumps(job))
    assert done.returncode == 0, done.stdout[-2000:]
    posts = [json.loads(body) for method, path, body in image_server.received if method == "POST"]
    assert posts, "no progress update arrived"
    for post in posts:
        assert post["status"] == "IN_PROGRESS" and post["output"]["stage"] == "denoise"
        assert 1 <= post["output"]["step"] <= 4 and post["output"]["steps"] == 4
    assert all(path.startswith("/job-done?id=progress-job") for method, path, _ in image_server.received)
