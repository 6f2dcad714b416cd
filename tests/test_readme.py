"""Every request example in the README is served by a tiny model, via the local API and the CLI."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from src.request import parse_request
from tests.conftest import ROOT, data_uri_of, png_bytes, worker_env
from tests.test_local_api import run_cli

README = (ROOT / "README.md").read_text()


def readme_examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", README, flags=re.S)
    jobs = [json.loads(block) for block in blocks if block.lstrip().startswith('{"input"')]
    assert len(jobs) >= 5
    return jobs


def offline(job: dict) -> dict:
    """The network is closed here: an example's image and mask URLs are swapped for pictures inline."""
    job_input = dict(job["input"])
    if job_input.get("image", "").startswith("http"):
        job_input["image"] = data_uri_of(png_bytes((640, 480)))
    if job_input.get("mask", "").startswith("http"):
        mask = Image.new("L", (640, 480), 0)
        mask.paste(255, (200, 120, 440, 360))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        job_input["mask"] = data_uri_of(buffer.getvalue())
    return {"input": job_input}


def test_the_two_commands_exist():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S)[1]
    for script in re.findall(r"bash (scripts/\S+\.sh)", first_block):
        assert (ROOT / script).is_file()


@pytest.mark.parametrize("job", readme_examples(), ids=lambda job: job["input"]["prompt"][:20])
def test_example_is_a_valid_request(job):
    parse_request(job["input"])


@pytest.mark.parametrize("job", readme_examples(), ids=lambda job: job["input"]["prompt"][:20])
def test_example_through_the_local_api(api, job):
    reply = api.runsync(offline(job)["input"])
    assert reply["status"] == "COMPLETED", reply.get("error")
    expected = job["input"].get("num_images", 1)
    assert len(reply["output"].get("images", [reply["output"]])) == expected


@pytest.mark.parametrize("job", readme_examples(), ids=lambda job: job["input"]["prompt"][:20])
def test_example_through_test_input(tiny_model, job):
    done = run_cli(worker_env(tiny_model), "--test_input", json.dumps(offline(job)))
    assert done.returncode == 0, done.stdout[-3000:]
