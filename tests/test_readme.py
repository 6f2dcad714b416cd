"""The README and docs/: every request example is served by a tiny model, via the local API and
the CLI, and every relative link and `#anchor` leads somewhere."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from builder.tiny_model import build_tiny_base
from src.request.parse import parse_request
from tests.conftest import ROOT, LocalAPI, data_uri_of, local_api, png_bytes, worker_env
from tests.test_local_api import run_cli
from tests.tiny_controlnets import build_tiny_depth, save_controlnet
from tests.tiny_loras import make_lora, save_lora

README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_examples() -> list[dict]:
    """Every `{"input": ...}` JSON block of the README and docs/."""
    blocks = [b for page in PAGES for b in re.findall(r"```json\n(.*?)```", page.read_text(), flags=re.S)]
    jobs = [json.loads(block) for block in blocks if block.lstrip().startswith('{"input"')]
    assert len(jobs) >= 10
    return jobs


def offline(job: dict) -> dict:
    """The network is closed here: an example's image and mask URLs are swapped for pictures inline,
    and a LoRA URL for a LoRA file of the same kind in LORA_DIRS (see `lora_dir`)."""
    job_input = dict(job["input"])
    if job_input.get("control_image", "").startswith("http"):
        job_input["control_image"] = data_uri_of(png_bytes((640, 480)))
    if job_input.get("image", "").startswith("http"):
        job_input["image"] = data_uri_of(png_bytes((640, 480)))
    if job_input.get("mask", "").startswith("http"):
        mask = Image.new("L", (640, 480), 0)
        mask.paste(255, (200, 120, 440, 360))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        job_input["mask"] = data_uri_of(buffer.getvalue())
    if "loras" in job_input:
        job_input["loras"] = [
            {**lora, "path": f"url-{i}.safetensors"} if lora["path"].startswith("http") else lora
            for i, lora in enumerate(job_input["loras"])
        ]
    return {"input": job_input}


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LORA_DIRS folder with every file the examples name, and the stand-ins for URLs."""
    folder = tmp_path_factory.mktemp("readme-loras")
    names = {lora["path"] for job in readme_examples() for lora in offline(job)["input"].get("loras", [])}
    for seed, name in enumerate(sorted(names)):
        save_lora(*make_lora(tiny_model, seed=seed), folder / name, "kohya")
    return folder


@pytest.fixture(scope="module")
def readme_env(tiny_model: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The examples' LoRAs in LORA_DIRS, a tiny 2.1 ControlNet and depth model for the control example,
    and a base-shaped model for the two-models example."""
    root = tmp_path_factory.mktemp("readme-control")
    _, release = save_controlnet(tiny_model, "2.1", root / "cn")
    depth = build_tiny_depth(root / "depth")
    base = build_tiny_base(tiny_model, root / "base")
    return worker_env(
        tiny_model,
        LORA_DIRS=str(lora_dir),
        CONTROLNET_MODEL=str(release),
        DEPTH_MODEL=str(depth),
        ZIMAGE_BASE_MODEL=str(base),
    )


@pytest.fixture(scope="module")
def api(readme_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAPI]:
    """conftest's local API, with the examples' LoRAs and a ControlNet."""
    env = readme_env
    with local_api(env, tmp_path_factory.mktemp("logs") / "readme-api.log") as server:
        yield server


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


def cli_examples() -> list[dict]:
    """The example the CLI runs: the first with a non-ASCII prompt (argv's encoding). Each example
    is served through the local API above; the CLI is the same handler behind the SDK's
    --test_input (tests/test_local_api.py runs a job through it), so running every example twice
    checked nothing more, at a worker start each (a sixth of the suite's time)."""
    return [next(job for job in readme_examples() if not job["input"]["prompt"].isascii())]


@pytest.mark.parametrize("job", cli_examples(), ids=lambda job: job["input"]["prompt"][:20])
def test_example_through_test_input(readme_env, job):
    done = run_cli(readme_env, "--test_input", json.dumps(offline(job)))
    assert done.returncode == 0, done.stdout[-3000:]
