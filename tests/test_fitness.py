"""Fitness at start: a worker that cannot serve tells Runpod so, and takes no job.

Deployed (`python handler.py` against the loopback job queue), each reason a start fails is
one unhealthy report (a ping with status=unhealthy, the check's name and a reason that names
the setting or file), then an exit, with the job left in the queue. The checks themselves are
tested here in-process; the SDK's side of the bargain (when it runs the checks, how it reports)
is read from its source, so a runpod upgrade that moves it fails here.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from src.jobs import fitness
from src.jobs.fitness import Unfit, device_computes, lora_cache_fits, model_folders
from src.runtime.settings import Settings
from tests.conftest import ROOT, end_process, worker_env
from tests.loopback_servers import JobQueue, deployed_worker

START_SECONDS = 180  # four workers' imports side by side, on a busy 2-core machine
# Locally (--test_input, --rp_serve_api) a failed start prints and exits 1 as it always did:
# tests/test_faults.py, test_security.py and test_storage.py start such workers.


def test_each_start_failure_is_one_unhealthy_report_naming_its_cause_and_no_job_is_taken(
    tiny_model, tmp_path
):
    blocker = tmp_path / "a-file"  # the LoRA cache's folder would have to be made inside a file
    blocker.write_text("")
    cases = {  # worker id: (its environment, the failing check, what its reason says)
        "bad-setting": (
            {"GPU_MEMORY_GB": "-1"},
            "settings",
            "SettingsError: GPU_MEMORY_GB: '-1' is not allowed",
        ),
        "no-model": (
            {"ZIMAGE_MODEL": "/nowhere/tiny-zimage"},
            "model_files",
            "ModelNotFound: ZIMAGE_MODEL: no complete model for '/nowhere/tiny-zimage'",
        ),
        "small-card": (
            {"GPU_MEMORY_GB": "0.001"},
            "weights",
            "MemoryRefusal: GPU_MEMORY_GB: 0.001 GB is below",
        ),
        "no-disk": (
            {"LORA_CACHE_DIR": str(blocker / "cache")},
            "disk",
            f"Unfit: LORA_CACHE_DIR: the LoRA cache's folder {blocker / 'cache'} cannot be made",
        ),
    }
    queue = JobQueue([{"id": "waiting", "input": {"prompt": "a lighthouse", "size": "256*256"}}])
    processes = {}
    try:
        for worker_id, (env, _, _) in cases.items():  # side by side: the imports dominate
            log = tmp_path / f"{worker_id}.log"
            processes[worker_id] = deployed_worker(worker_env(tiny_model, **queue.env(worker_id), **env), log)
        codes = {worker_id: process.wait(timeout=START_SECONDS) for worker_id, process in processes.items()}
    finally:
        for process in processes.values():
            end_process(process)
        queue.close()

    for worker_id, (_, check, reason) in cases.items():
        log = (tmp_path / f"{worker_id}.log").read_text()
        assert codes[worker_id] == 1, log[-3000:]
        reports = [query for worker, query in queue.ping_queries if worker == worker_id]
        assert len(reports) == 1, (reports, log[-3000:])  # the report, and no heartbeat
        assert reports[0]["status"] == "unhealthy" and reports[0]["check"] == check, reports
        assert reports[0]["reason"].startswith(reason), reports[0]["reason"]
        assert "cannot start: " + reason.split(": ", 1)[1] in log
        assert f"Fitness check failed: {check}" in log and "Traceback" not in log
    assert queue.take_requests == [] and [job["id"] for job in queue.backlog] == ["waiting"]


def test_the_sdk_runs_the_checks_before_its_heartbeat_and_first_job_and_reports_a_failure():
    """What src/jobs/fitness.py relies on in runpod's worker loop and fitness module."""
    from runpod.serverless import worker as sdk_worker
    from runpod.serverless.modules import rp_fitness

    run = inspect.getsource(sdk_worker.run_worker)
    assert run.index("run_fitness_checks()") < run.index("start_ping") < run.index("JobScaler(config)")
    local = inspect.getsource(sdk_worker._is_local)  # src/jobs/job_loop.py runs_fitness_checks reads the same
    assert '"test_input"' in local and '"RUNPOD_WEBHOOK_GET_JOB"' in local
    checks = inspect.getsource(rp_fitness.run_fitness_checks)
    # Its own checks are added once, when the phase begins: `Start.register` adds them earlier.
    assert "_ensure_gpu_check_registered()" in checks and "_ensure_system_checks_registered()" in checks
    assert 'if _registration_state["gpu_check"]' in inspect.getsource(rp_fitness._ensure_gpu_check_registered)
    assert 'if _registration_state["system_checks"]' in inspect.getsource(
        rp_fitness._ensure_system_checks_registered
    )
    # A check's name is its function's; a failure is reported with it and the reason, then exit.
    assert "check_name = check_func.__name__" in checks
    assert '_report_unhealthy(check_name, f"{error_type}: {error_message}")' in checks
    assert "_terminate_unhealthy(1)" in checks
    report = inspect.getsource(rp_fitness._report_unhealthy)
    assert (
        '"status": "unhealthy"' in report and '"check": check' in report and "RUNPOD_WEBHOOK_PING" in report
    )


def test_the_parts_keep_their_names_for_the_report():
    start = fitness.Start({"ZIMAGE_MODEL": "/nowhere"}, lambda worker: worker, 0.0)
    names = [fitness.logged(part).__name__ for part in [*start.checks(), start.weights]]
    assert names == ["settings", "model_files", "gpu", "disk", "weights"]
    assert fitness.Start({"MAX_CONCURRENCY": "0"}, lambda worker: worker, 0.0).unfit is not None


def test_the_device_check_passes_a_working_device_and_fails_one_that_cannot_compute(monkeypatch):
    device_computes()  # this machine's CPU, in its compute dtype
    monkeypatch.setattr(fitness, "pick_device", lambda: (torch.device("cpu"), torch.bfloat16))
    device_computes()  # bf16's rounding is within the tolerance
    # A device whose results cannot be read back: what a broken card or a too-old driver gives.
    monkeypatch.setattr(fitness, "pick_device", lambda: (torch.device("meta"), torch.float32))
    with pytest.raises(Unfit) as unfit:
        device_computes()
    assert str(unfit.value).startswith("GPU: meta (meta) failed a 256x256 float32 matrix product (")


def test_the_device_check_fails_a_device_that_computes_wrongly(monkeypatch):
    # int8 stands for a card whose arithmetic is broken: the product comes back far off.
    monkeypatch.setattr(fitness, "pick_device", lambda: (torch.device("cpu"), torch.int8))
    with pytest.raises(Unfit) as unfit:
        device_computes()
    message = str(unfit.value)
    assert message.startswith("GPU: cpu (cpu) failed a 256x256 int8 matrix product: off by ")
    assert "the card computes wrongly and this machine cannot serve" in message


Usage = namedtuple("Usage", "total used free")


def test_the_lora_cache_needs_a_folder_and_room_for_one_lora(tmp_path, caplog):
    settings = Settings(lora_cache_dir=str(tmp_path / "cache"), lora_max_mb=1024, lora_cache_gb=20.0)
    with pytest.raises(Unfit) as unfit:
        lora_cache_fits(settings, lambda path: Usage(0, 0, 100 * 2**20))
    assert str(unfit.value).startswith(f"LORA_CACHE_DIR: {tmp_path / 'cache'} has room for 100 MiB")
    assert "LORA_MAX_MB (1024 MiB)" in str(unfit.value)
    # Files already in the cache count as room: they are evicted for new ones.
    (tmp_path / "cache" / "held.safetensors").write_bytes(b"\0" * (2**20))
    caplog.set_level(logging.WARNING)
    lora_cache_fits(replace(settings, lora_max_mb=100), lambda path: Usage(0, 0, 99 * 2**20))
    assert "less than LORA_CACHE_GB (20): set LORA_CACHE_GB to at most that" in caplog.text
    (tmp_path / "file").write_text("")
    with pytest.raises(Unfit, match="cannot be made \\(NotADirectoryError\\)"):
        lora_cache_fits(Settings(lora_cache_dir=str(tmp_path / "file" / "cache")))


def test_the_model_files_checked_are_those_the_settings_load(tiny_model: Path):
    plain = Settings(model=str(tiny_model), safety_checker_model="none")
    assert [name for _, _, name in model_folders(plain)] == ["ZIMAGE_MODEL"]
    everything = Settings(
        base_model="Tongyi-MAI/Z-Image",
        controlnet_model="some/controlnet",
        prompt_expander_model="Qwen/Qwen3-4B",
        pose_model="usyd-community/vitpose-base-simple",
    )
    assert [name for _, _, name in model_folders(everything)] == [
        "ZIMAGE_MODEL",
        "ZIMAGE_BASE_MODEL",
        "SAFETY_CHECKER_MODEL",
        "PROMPT_EXPANDER_MODEL",
        "DEPTH_MODEL",
        "POSE_MODEL",
        "POSE_DETECTOR_MODEL",
    ]
    assert [name for _, _, name in model_folders(Settings(controlnet_model="none"))] == [
        "ZIMAGE_MODEL",
        "SAFETY_CHECKER_MODEL",
    ]


def test_the_image_asks_the_sdk_for_the_cuda_its_torch_needs():
    """The Dockerfile's RUNPOD_MIN_CUDA_VERSION (the SDK's driver check) is the CUDA of the lock's
    torch build (its cuda-toolkit) and of the base image."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    lock = (ROOT / "locks" / "worker-cuda.txt").read_text()
    toolkit = re.search(r"^cuda-toolkit==(\d+\.\d+)\.", lock, re.MULTILINE)
    wanted = re.search(r"RUNPOD_MIN_CUDA_VERSION=(\d+\.\d+)\s", dockerfile)
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)\.", dockerfile, re.MULTILINE)
    assert toolkit and wanted and base
    assert wanted[1] == toolkit[1] == base[1]


def test_registered_the_cheap_checks_come_first_then_the_sdk_s_own_then_the_weights(monkeypatch):
    from runpod.serverless.modules import rp_fitness

    monkeypatch.setenv("RUNPOD_SKIP_GPU_CHECK", "true")  # no GPU here: its test would find none
    monkeypatch.delenv("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", raising=False)
    rp_fitness.clear_fitness_checks()
    rp_fitness._reset_registration_state()
    try:
        fitness.Start({}, lambda worker: worker, 0.0).register()
        names = [check.__name__ for check in rp_fitness._fitness_checks]
    finally:  # registered, never run
        rp_fitness.clear_fitness_checks()
        rp_fitness._reset_registration_state()
    assert names[:4] == ["settings", "model_files", "gpu", "disk"] and names[-1] == "weights"
    assert {"_memory_check", "_disk_check", "_network_check"} <= set(names[4:-1])
