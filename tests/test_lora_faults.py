"""LoRAs from a real HTTP host on loopback: the cache, and every way a LoRA can fail.

Each failure names `loras[0]`, never shows a URL's query string (download tokens), and the
worker serves the next job with the base weights, byte for byte.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from src.jobs.worker import Worker
from src.runtime.settings import Settings
from tests.conftest import Route, handle_job
from tests.tiny_loras import make_lora, save_lora

BASE = {"prompt": "a red fox in snow", "size": "256*256", "seed": 5, "num_inference_steps": 1}
TOKEN = "tok3n-s3cr3t-77"


@pytest.fixture(scope="module")
def lora_bytes(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = save_lora(*make_lora(tiny_model, seed=4), tmp_path_factory.mktemp("l") / "a.safetensors", "kohya")
    return path.read_bytes()


@pytest.fixture(scope="module")
def url_worker(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    settings = Settings(
        model=str(tiny_model),
        safety_checker_model="none",
        lora_dirs=(str(tmp_path_factory.mktemp("no-loras")),),
        lora_cache_dir=str(tmp_path_factory.mktemp("lora-cache")),
        lora_max_mb=1,
    )
    return Worker.start(settings)


@pytest.fixture(scope="module")
def base_bytes(worker: Worker) -> str:
    return handle_job(worker, {"id": "base", "input": BASE})["image_url"]


def job(worker: Worker, url: str, **fields) -> dict:
    return handle_job(worker, {"id": "lora-job", "input": {**BASE, "loras": [{"path": url}], **fields}})


def test_a_civitai_style_url_downloads_once_and_then_comes_from_the_cache(
    url_worker, image_server, allow_loopback_downloads, lora_bytes, base_bytes, caplog
):
    path = "/api/download/models/12345"
    image_server.routes[f"{path}?token={TOKEN}"] = Route(lora_bytes)
    url = f"{image_server.url}{path}?token={TOKEN}"
    before = url_worker.loras.files.downloads
    with caplog.at_level(logging.INFO):
        first = job(url_worker, url)
        second = job(url_worker, url)
    assert "error" not in first and first["image_url"] == second["image_url"] != base_bytes
    assert url_worker.loras.files.downloads == before + 1
    assert [entry for entry in image_server.received if entry[1].startswith(path)] == [
        ("GET", f"{path}?token={TOKEN}", b"")
    ]
    assert TOKEN not in caplog.text and "12345" not in caplog.text  # logs name a LoRA by its hash only
    assert len(list(url_worker.settings.lora_cache_path.glob("*.safetensors"))) >= 1
    assert not list(url_worker.settings.lora_cache_path.glob(".*.part"))


def flux_lora() -> bytes:
    """A valid safetensors LoRA in diffusers' layout, for Flux's blocks."""
    return save(
        {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        }
    )


def pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.zeros(4, 32)}, buffer)
    return buffer.getvalue()


def over_cap(lora: bytes) -> bytes:
    return lora + b"\0" * (2 * 1024 * 1024)


FAULTS = {
    "another model": (
        lambda lora: Route(flux_lora()),
        "none for a Z-Image transformer module: it looks like a Flux LoRA",
    ),
    "truncated": (lambda lora: Route(lora[: len(lora) - 100]), "truncated"),
    "pickle": (lambda lora: Route(pickle_bytes()), "is a pickle"),
    "not found": (lambda lora: Route(b"gone", 404), "failed with HTTP 404"),
    "over the cap": (lambda lora: Route(over_cap(lora)), "over the LORA_MAX_MB cap of 1 MiB"),
    "over the cap, no length": (lambda lora: Route(over_cap(lora), length=False), "over the LORA_MAX_MB cap"),
    "slow host": (lambda lora: Route(lora, delay=0.5), "took over 1 s"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_lora_fails_naming_loras_and_the_worker_serves_on(
    url_worker, image_server, allow_loopback_downloads, lora_bytes, base_bytes, monkeypatch, caplog, fault
):
    monkeypatch.setattr("src.lora.files.DOWNLOAD_SECONDS", 1.0)
    route, expected = FAULTS[fault]
    name = fault.replace(" ", "-").replace(",", "")
    image_server.routes[f"/{name}.safetensors?X-Amz-Signature={TOKEN}"] = route(lora_bytes)
    with caplog.at_level(logging.INFO):
        failed = job(url_worker, f"{image_server.url}/{name}.safetensors?X-Amz-Signature={TOKEN}")
    assert failed["error"].startswith("loras[0]"), failed
    assert expected in failed["error"], failed["error"]
    assert TOKEN not in failed["error"] and TOKEN not in caplog.text
    assert not list(url_worker.settings.lora_cache_path.glob(".*.part"))
    assert handle_job(url_worker, {"id": "next", "input": BASE})["image_url"] == base_bytes


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("../../etc/passwd.safetensors", "path separators are not allowed"),
        ("..safetensors", "'..' is not allowed"),
        ("file:///etc/passwd", "the scheme 'file' is not allowed"),
        ("ftp://example.com/a.safetensors", "the scheme 'ftp' is not allowed"),
        ("model.ckpt", "pickle formats"),
        (f"https://example.com/model.pt?token={TOKEN}", "pickle formats"),
        ("missing.safetensors", "was not found in LORA_DIRS"),
    ],
)
def test_paths_outside_the_rules_are_refused(url_worker, base_bytes, path, expected):
    failed = job(url_worker, path)
    assert failed["error"].startswith("loras[0].path: ") and expected in failed["error"], failed
    assert TOKEN not in failed["error"]
    assert handle_job(url_worker, {"id": "next", "input": BASE})["image_url"] == base_bytes


def test_private_addresses_are_refused_without_the_sdk_switch(url_worker, image_server, lora_bytes):
    image_server.routes["/a.safetensors"] = Route(lora_bytes)
    failed = job(url_worker, f"{image_server.url}/a.safetensors?token={TOKEN}")
    assert failed["error"].startswith("loras[0]: ") and "refused" in failed["error"], failed
    assert TOKEN not in failed["error"] and image_server.received == []
