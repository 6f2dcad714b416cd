"""Faults: an image host that breaks mid-download, out of memory mid-job, a corrupt model at start.

Each fault fails the one job it hits with a clean message, nothing half-made is returned as
a result, and the next job on the same worker succeeds. A broken model folder stops the
worker at start, with a message and without a traceback. (Storage that is down, slow or
refusing is covered against a real S3 server in tests/test_storage.py.)

The failing image hosts are raw sockets on 127.0.0.1 that misbehave at the byte level, which
an HTTP server library will not do; the in-process worker fetches from them with the SDK's
loopback switch on, and is sent no other URL.
"""

from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import torch

import src.inputs.pictures as input_image
import src.runtime.gpu as gpu_module
from src.jobs.worker import Worker
from src.model.files import ModelNotFound
from src.model.safety import SafetyModelError
from src.runtime.settings import Settings
from tests.conftest import (
    data_uri_of,
    decode_data_uri,
    failed_start,
    free_port,
    handle_job,
    png_bytes,
)

PNG = png_bytes((320, 240), (10, 200, 90))
SMALL = {"size": "256*256", "num_inference_steps": 1, "output_format": "png"}


# ---------------------------------------------------------------- a misbehaving host
class RawHost:
    """A TCP server on 127.0.0.1 that runs `behave(conn)` for every connection, after reading
    the request head; it speaks only as much HTTP as each fault needs."""

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.behave = behave
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/image.png"
        self.connections = 0
        # Per connection, seconds from the request's head to the end of `behave` (the host's own
        # clock: for a trickle, how long the worker kept the download open), set as it ends.
        self.served: list[float] = []
        self.ended = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            began = time.monotonic()
            try:
                self.behave(conn)
            except OSError:
                pass  # the client gave up first: that is the point of most faults
            self.served.append(time.monotonic() - began)
            self.ended.set()

    def close(self) -> None:
        self.sock.close()


def _head(length: int | None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Connection: close\r\n"
    return f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n{size}\r\n".encode()


def short_body(conn: socket.socket) -> None:
    """Declares the whole file, sends a fifth of it, closes: a host that dies mid-transfer."""
    conn.sendall(_head(len(PNG)) + PNG[: len(PNG) // 5])


def reset_mid_body(conn: socket.socket) -> None:
    """Sends part of the body, then a TCP reset instead of a close."""
    conn.sendall(_head(len(PNG)) + PNG[: len(PNG) // 2])
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def no_answer_then_close(conn: socket.socket) -> None:
    """Reads the request and hangs up without a status line."""


def garbage(conn: socket.socket) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe garbage\r\n\r\n")


def unannounced_truncation(conn: socket.socket) -> None:
    """No Content-Length: the close ends the body, so the download 'succeeds' with half a PNG."""
    conn.sendall(_head(None) + PNG[: len(PNG) // 2])


def silent(conn: socket.socket) -> None:
    """Accepts the request and never answers: only the read timeout ends it."""
    time.sleep(15)


def trickle(conn: socket.socket) -> None:
    """A byte every 0.1 s for up to 8 s: never silent long enough for a read timeout."""
    conn.sendall(_head(100_000))
    for _ in range(80):
        conn.sendall(b"\x00")
        time.sleep(0.1)


HOST_FAULTS = [
    pytest.param(short_body, "could not be fetched", id="short-body-then-close"),
    pytest.param(reset_mid_body, "could not be fetched", id="reset-mid-body"),
    pytest.param(no_answer_then_close, "could not be fetched", id="close-without-answer"),
    pytest.param(garbage, "could not be fetched", id="not-http"),
    pytest.param(unannounced_truncation, "broken or truncated", id="truncated-without-length"),
    pytest.param(silent, "timed out", id="silent-after-request"),
]


@pytest.fixture
def host(request) -> Iterator[Callable[[Callable[[socket.socket], None]], RawHost]]:
    hosts: list[RawHost] = []

    def start(behave: Callable[[socket.socket], None]) -> RawHost:
        hosts.append(RawHost(behave))
        return hosts[-1]

    yield start
    for started in hosts:
        started.close()


def job(worker: Worker, job_id: str, **fields: object) -> dict:
    return handle_job(worker, {"id": job_id, "input": {"prompt": "a green field", **SMALL, **fields}})


def assert_failed_cleanly(result: dict, starts: str, says: str = "") -> None:
    # Only the error: no image_url, images or cost next to it, so nothing half-made looks done.
    assert set(result) == {"error"}, result
    assert result["error"].startswith(starts), result["error"]
    assert says in result["error"], result["error"]
    assert "Traceback" not in result["error"]


def assert_serves_the_next_job(worker: Worker) -> None:
    result = job(worker, "next", seed=3)
    assert "error" not in result, result
    assert decode_data_uri(result["image_url"]).size == (256, 256)


@pytest.mark.parametrize(("behave", "says"), HOST_FAULTS)
def test_image_host_failing_mid_download(worker, host, allow_loopback_downloads, behave, says):
    server = host(behave)
    started = time.monotonic()
    result = job(worker, "fault", image=server.url, strength=0.5)
    assert_failed_cleanly(result, "image:", says)
    assert server.connections >= 1  # it was this host's fault, not a refusal before connecting
    assert time.monotonic() - started < 20
    assert_serves_the_next_job(worker)


def test_a_trickling_host_is_cut_off_at_the_cap(worker, host, allow_loopback_downloads, monkeypatch):
    """The time cap holds even when every read returns a byte before the read timeout.

    Reads return only when a 64 KiB chunk completes, so only a watchdog can hold this cap
    against a host that sends a byte every few seconds.
    """
    monkeypatch.setattr(input_image, "DOWNLOAD_SECONDS", 2.0)
    server = host(trickle)
    result = job(worker, "trickle", image=server.url, strength=0.5)
    assert_failed_cleanly(result, "image:")
    assert "took over 2 s" in result["error"], result
    # The time the host saw the download open (its own clock, a send failing once the socket is
    # shut), not the test's wall clock around a loaded job: the 2 s cap, never the 8 s trickle.
    assert server.ended.wait(timeout=30)
    assert 2.0 <= server.served[0] < 4, server.served
    assert_serves_the_next_job(worker)


# ------------------------------------------------------------------ out of memory
def _oom_on_call(module: torch.nn.Module, call: int) -> torch.utils.hooks.RemovableHandle:
    """Raise CUDA's out-of-memory error on the `call`-th forward of `module` (1-based)."""
    calls = {"n": 0}

    def hook(*args: object) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

    return module.register_forward_pre_hook(hook)


OOM_STAGES = [
    # (stage, the module that fails, on which call, extra request fields)
    pytest.param("transformer", 3, {"num_inference_steps": 4}, id="mid-denoise-step-3-of-4"),
    pytest.param("vae.decoder", 1, {}, id="vae-decode"),
    pytest.param("vae.encoder", 1, {"image": data_uri_of(PNG), "strength": 0.6}, id="vae-encode-img2img"),
    pytest.param("text_encoder", 1, {}, id="text-encoder"),
]


@pytest.mark.parametrize(("stage", "call", "fields"), OOM_STAGES)
def test_out_of_memory_at_each_stage(worker, monkeypatch, request, stage, call, fields):
    freed = []
    free_memory = gpu_module.free_memory
    monkeypatch.setattr(gpu_module, "free_memory", lambda: (freed.append(True), free_memory()))
    pipe = worker.generator.text_to_image
    module = pipe
    for part in stage.split("."):
        module = getattr(module, part)
    # A prompt no other test used, so the text encoder really runs (the prompt cache is cold).
    prompt = f"out of memory during {request.node.callspec.id}"
    request_fields = {"prompt": prompt, **SMALL, "seed": 11, **fields}
    reference = None
    if stage != "text_encoder":
        reference = handle_job(worker, {"id": "before", "input": request_fields})
        assert "error" not in reference, reference

    hook = _oom_on_call(module, call)
    try:
        failed = handle_job(worker, {"id": "oom", "input": request_fields})
    finally:
        hook.remove()

    assert_failed_cleanly(failed, "out of GPU memory for this request")
    assert freed == [True]  # the worker released memory after this job, once
    after = handle_job(worker, {"id": "after", "input": request_fields})
    assert "error" not in after, after
    if reference is not None:
        # Nothing the failed job left behind (cached embeddings, RNG state) changes the next one.
        assert after["image_url"] == reference["image_url"]
    again = handle_job(worker, {"id": "again", "input": request_fields})
    assert again["image_url"] == after["image_url"]


# ------------------------------------------------------------- corrupt model at start
def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt(folder: Path, how: str) -> None:
    transformer = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if how == "truncated-transformer":
        _truncate(transformer, transformer.stat().st_size // 3)
    elif how == "truncated-header":
        _truncate(transformer, 20)
    elif how == "empty-vae-weights":
        (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    elif how == "truncated-text-encoder":
        weights = folder / "text_encoder" / "model.safetensors"
        _truncate(weights, weights.stat().st_size // 2)
    elif how == "model-index-not-json":
        (folder / "model_index.json").write_text("{not json")
    elif how == "model-index-empty":
        (folder / "model_index.json").write_text("")
    elif how == "missing-component":
        shutil.rmtree(folder / "vae")
    elif how == "component-config-not-json":
        (folder / "transformer" / "config.json").write_text("{broken")
    elif how == "tokenizer-not-json":
        (folder / "tokenizer" / "tokenizer.json").write_text("{broken")
    elif how == "shard-index-names-a-missing-shard":
        transformer.rename(transformer.with_name("diffusion_pytorch_model-00001-of-00002.safetensors"))
        (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            '{"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",'
            ' "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}'
        )
    else:
        raise AssertionError(how)


# Caught by the file check before any weight loads.
CHECKED = [
    "model-index-not-json",
    "model-index-empty",
    "missing-component",
    "shard-index-names-a-missing-shard",
]
# Found only when diffusers reads the files.
UNREADABLE = [
    "truncated-transformer",
    "truncated-header",
    "empty-vae-weights",
    "truncated-text-encoder",
    "component-config-not-json",
    "tokenizer-not-json",
]


@pytest.fixture
def broken_copy(tiny_model, tmp_path) -> Callable[[str], Path]:
    def make(how: str) -> Path:
        folder = tmp_path / how
        shutil.copytree(tiny_model, folder)
        _corrupt(folder, how)
        return folder

    return make


@pytest.mark.parametrize("how", CHECKED + UNREADABLE)
def test_a_corrupt_model_stops_the_start_with_a_message(broken_copy, how):
    folder = broken_copy(how)
    with pytest.raises(ModelNotFound) as caught:
        Worker.start(Settings(model=str(folder), safety_checker_model="none"))
    message = str(caught.value)
    assert message.startswith("ZIMAGE_MODEL:") and str(folder) in message, message


def test_a_corrupt_safety_checker_stops_the_start_with_a_message(tiny_model, never_flags, tmp_path):
    folder = tmp_path / "checker"
    shutil.copytree(never_flags, folder)
    weights = folder / "model.safetensors"
    _truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(SafetyModelError) as caught:
        Worker.start(Settings(model=str(tiny_model), safety_checker_model=str(folder)))
    message = str(caught.value)
    assert message.startswith("SAFETY_CHECKER_MODEL:") and str(folder) in message, message


START_CASES = [
    "model-index-not-json",
    "missing-component",
    "truncated-transformer",
]


@pytest.mark.parametrize("how", START_CASES)
def test_handler_exits_at_start_on_a_corrupt_model(broken_copy, how):
    """`python handler.py --rp_serve_api` as deployed: it exits non-zero and never listens."""
    folder = broken_copy(how)
    port = free_port()
    started = time.monotonic()
    output = failed_start(folder, port)
    elapsed = time.monotonic() - started
    assert "cannot start: ZIMAGE_MODEL:" in output and str(folder) in output, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    assert elapsed < 90, f"took {elapsed:.0f} s to give up"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/docs", timeout=2)
