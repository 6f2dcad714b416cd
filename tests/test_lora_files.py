"""The `loras` request rules, the safetensors check and the disk cache, without a model."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from src.lora.adapters import looks_like
from src.lora.files import LoraFiles, check_safetensors_file, check_safetensors_head
from src.request.parse import parse_request
from src.runtime.errors import JobError
from src.runtime.gpu import Stop
from src.runtime.logs import redact
from tests.conftest import Route

LORA = save({"lora_unet_layers_0_attention_to_q.lora_down.weight": torch.ones(2, 8)})


def error(loras: object) -> str:
    with pytest.raises(JobError) as caught:
        parse_request({"prompt": "a", "loras": loras})
    return str(caught.value)


@pytest.mark.parametrize(
    "path",
    [
        "https://huggingface.co/user/zimage-style/resolve/main/style.safetensors?download=true",
        "https://civitai.com/api/download/models/12345?type=Model&format=SafeTensor&token=abc",
        "https://bucket.s3.amazonaws.com/loras/a.safetensors?X-Amz-Signature=abc",
        "my_style-v1.2.safetensors",
    ],
)
def test_urls_and_file_names_that_are_accepted(path):
    request = parse_request({"prompt": "a", "loras": [{"path": path}]})
    assert request.loras[0].path == path and request.loras[0].scale == 1.0


def test_no_loras_by_default():
    assert parse_request({"prompt": "a"}).loras == []


@pytest.mark.parametrize(
    ("loras", "expected"),
    [
        ([{"path": "a.safetensors", "scale": 4.5}], "loras[0].scale: 4.5 (a number) is not allowed"),
        ([{"path": "a.safetensors", "scale": True}], "loras[0].scale: true (a boolean) is not allowed"),
        ([{"path": "a.safetensors", "scale": "1"}], "loras[0].scale: '1' is not allowed"),
        (
            [{"path": "a.safetensors", "weight": 1}],
            "loras[0].weight: unknown field; allowed fields: path, scale",
        ),
        ([{"scale": 1.0}], "loras[0].path: required"),
        (["a.safetensors"], "loras[0]: 'a.safetensors' is not allowed: it must be an object"),
        (
            [{"path": "a.safetensors"}, {"path": "a.safetensors"}],
            "loras[1].path: 'a.safetensors' is not allowed",
        ),
        ([{"path": f"{i}.safetensors"} for i in range(4)], "loras: "),
        ({"path": "a.safetensors"}, "loras: an object is not allowed: it must be a list"),
        ([{"path": "a/b.safetensors"}], "loras[0].path: 'a/b.safetensors' is not allowed: path separators"),
        ([{"path": "a\\b.safetensors"}], "path separators"),
        ([{"path": "style.bin"}], "pickle formats"),
        ([{"path": "style.pth"}], "pickle formats"),
        ([{"path": "style.zip"}], "a file name must be 'name.safetensors'"),
        ([{"path": "https://example.com/x.json"}], "a URL must name a .safetensors file"),
        ([{"path": "data:application/octet-stream;base64,AAAA"}], "path separators"),
    ],
)
def test_bad_entries_name_the_entry_and_key(loras, expected):
    assert expected in error(loras)


def test_a_urls_query_is_never_echoed():
    message = error([{"path": "https://h.example/a.ckpt?token=s3cret"}, {"path": 1}])
    assert "s3cret" not in message and "'https://h.example/a.ckpt'" in message
    duplicate = [{"path": "https://h.example/d?token=s3cret"}] * 2
    assert "s3cret" not in error(duplicate)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PK\x03\x04" + b"\0" * 60, "is a pickle"),
        (b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9 j\xa8" + b"\0" * 60, "is a pickle"),
        (b"<html>not found</html>", "not a safetensors file"),
        (b'\x07\0\0\0\0\0\0\0{"a":1}', "header is not valid safetensors JSON"),
    ],
)
def test_the_header_check_refuses_what_is_not_safetensors(data, expected):
    with pytest.raises(JobError, match=expected):
        check_safetensors_head("loras[0]", data)


def test_the_header_check_waits_for_the_whole_header_then_accepts():
    assert check_safetensors_head("loras[0]", LORA[:20]) is False
    assert check_safetensors_head("loras[0]", LORA) is True


def test_a_file_shorter_than_its_header_says_is_truncated(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(LORA[:-3])
    with pytest.raises(JobError, match="truncated"):
        check_safetensors_file("loras[0]", path)
    path.write_bytes(LORA)
    check_safetensors_file("loras[0]", path)


def test_the_cache_deletes_the_least_recently_used_past_its_budget(
    tmp_path, image_server, allow_loopback_downloads
):
    size = len(LORA)
    files = LoraFiles((), tmp_path, cache_gb=2.5 * size / 1e9, max_mb=1)
    for name in "abc":
        image_server.routes[f"/{name}"] = Route(LORA)
    first = files.fetch(0, f"{image_server.url}/a", Stop()).path
    os.utime(first, (time.time() - 100, time.time() - 100))
    second = files.fetch(0, f"{image_server.url}/b", Stop()).path
    os.utime(second, (time.time() - 50, time.time() - 50))
    files.fetch(0, f"{image_server.url}/a", Stop())  # a cache hit: now the most recent
    third = files.fetch(0, f"{image_server.url}/c", Stop()).path
    assert first.exists() and third.exists() and not second.exists()
    assert files.downloads == 3


def test_two_workers_on_one_volume_download_the_same_url_safely(
    tmp_path, image_server, allow_loopback_downloads
):
    image_server.routes["/shared"] = Route(LORA, delay=0.01)
    # Two LoraFiles are two processes' views of one folder: no lock in common.
    caches = [LoraFiles((), tmp_path, cache_gb=1.0, max_mb=1) for _ in range(2)]
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda c=c: results.append(c.fetch(0, f"{image_server.url}/shared", Stop()).path)
        )
        for c in caches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == LORA
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no temp file left behind


def test_file_names_are_looked_up_in_lora_dirs_in_order(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    second.mkdir()
    (second / "x.safetensors").write_bytes(LORA)
    files = LoraFiles((str(first), str(second)), tmp_path / "cache", cache_gb=1.0, max_mb=1)
    found = files.fetch(0, "x.safetensors", Stop())
    assert found.path == second / "x.safetensors" and len(found.digest) == 64
    first.mkdir()
    (first / "x.safetensors").write_bytes(LORA)
    assert files.fetch(0, "x.safetensors", Stop()).path == first / "x.safetensors"


def test_the_log_filter_masks_download_tokens_even_in_the_sdks_debug_lines():
    line = "{'loras': [{'path': 'https://civitai.com/api/download/models/1?type=Model&token=s3cret'}]}"
    assert "s3cret" not in redact(line) and "type=Model" in redact(line)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
            "a Stable Diffusion 1.x/SDXL UNet LoRA",
        ),
        (["transformer.single_transformer_blocks.3.attn.to_k.lora_A.weight"], "a Flux LoRA"),
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], "a Flux LoRA"),
        (["transformer.joint_blocks.0.x_block.attn.qkv.lora_A.weight"], "a Stable Diffusion 3 LoRA"),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"], "a text-encoder LoRA"),
        (["weird key\nwith newline"], "keys like 'weird?key?with?newline'"),
    ],
)
def test_a_foreign_lora_is_described_by_its_keys(keys, expected):
    assert looks_like(keys) == expected
