"""`bash benchmarks/gpu.sh`, proven on the CPU before a GPU runs it.

--prepare fetches real wheels from PyPI (pip's cache makes a second run cheap); --tiny runs
every section on the tiny model with short time boxes, one section made to fail and one
made to hang, and the report is built from what that run wrote.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu.bench import BOXES, BUDGET_S, RESULTS, TABLE
from benchmarks.gpu.report import END, START, gpu_section, read_results, replace_section
from benchmarks.gpu.wheels import MAX_MIB, normalise, pinned, wheel_name_version
from src.model.memory import PLANS
from tests.conftest import ROOT


def gpu_sh(*args: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu.sh", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_carried_pins_are_the_docker_locks_and_the_versions_the_tests_run_with():
    cuda_lock = (ROOT / "locks/worker-cuda.txt").read_text()
    for name, version in pinned().items():
        if name == "torchao":  # only the GPU machine's fp8 row uses it: in no lock (gpu/wheels.py's FP8)
            continue
        assert f"\n{name}=={version} " in cuda_lock.replace("_", "-").lower(), name
        assert importlib.metadata.version(name) == version, name


def test_prepare_fetches_one_linux_cp312_wheel_per_missing_package(tmp_path):
    wheels = tmp_path / "wheels"
    done = gpu_sh("--prepare", str(wheels), env={}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = {wheel_name_version(path): path.name for path in wheels.glob("*.whl")}
    assert set(found) == set(pinned().items())
    for name in found.values():
        python_tag, abi, platform = name.removesuffix(".whl").split("-")[-3:]
        assert python_tag in ("py3", "cp312") or abi == "abi3", name
        assert platform == "any" or "x86_64" in platform and "manylinux" in platform, name
    total_mib = sum(path.stat().st_size for path in wheels.iterdir()) / 2**20
    assert total_mib < MAX_MIB
    assert f"{total_mib:.2f} MiB" in done.stdout

    # On the GPU machine, only the packages it lacks are installed. Here the venv has them all
    # at the pinned versions but torchao, so only it is; without site-packages (-S) every one
    # is missing (of the wheels that install on this Python: the cp312-only ones cannot).
    portable = tmp_path / "portable"
    portable.mkdir()
    for path in wheels.glob("*.whl"):
        if path.name.endswith("-none-any.whl") or "-abi3-" in path.name:
            (portable / path.name).symlink_to(path)
    expected = {wheel_name_version(path)[0] for path in portable.iterdir()}
    assert {"diffusers", "runpod", "torchao"} <= expected
    for flags, folder, names in (([], wheels, {"torchao"}), (["-S"], portable, expected)):
        site = tmp_path / f"site{len(flags)}"
        subprocess.run(
            [sys.executable, *flags, "benchmarks/gpu/wheels.py", "install", str(folder), str(site)],
            cwd=ROOT,
            check=True,
        )
        assert {normalise(p.name.split("-")[0]) for p in site.glob("*.dist-info")} == names


# The boxes and budget are sized for a GPU; on a busy 2-core CPU the tiny run of every section
# can take longer than that (about 430 s seen under load against the 480 s budget). These tests
# check what the sections do, not their speed, so the CPU run gets CPU_SCALE times the room.
CPU_SCALE = 4
# The tiny run is set up inside the first test that uses it, under that test's timeout.
pytestmark = pytest.mark.timeout(BUDGET_S * CPU_SCALE + 300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One --tiny run: attention made to fail, machine made to hang past a 3 s box."""
    out = tmp_path_factory.mktemp("gpu-bench-out")
    roomy = ",".join(f"{name}={box * CPU_SCALE}" for name, box in BOXES.items() if name != "machine")
    env = {
        "OUT": str(out),
        "GPU_BENCH_WORK": str(tmp_path_factory.mktemp("gpu-bench-work")),
        "GPU_BENCH_SIZES": "256*256",
        "GPU_BENCH_RUNS": "1",
        "GPU_BENCH_FAIL": "attention",
        "GPU_BENCH_HANG": "machine",
        "GPU_BENCH_BOXES": f"machine=3,{roomy}",
        "GPU_BENCH_BUDGET": str(BUDGET_S * CPU_SCALE),
    }
    done = gpu_sh("--tiny", env=env, timeout=BUDGET_S * CPU_SCALE + 120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def test_every_section_ends_with_a_status_and_a_failure_stops_none_after_it(tiny_run):
    rows = read_results(tiny_run / RESULTS)
    status = {row["section"]: row for row in rows if "status" in row}
    assert list(status) == list(BOXES)
    assert status["machine"]["status"] == "timeout"
    assert status["attention"]["status"] == "error"
    assert "made to fail by GPU_BENCH_FAIL=attention" in status["attention"]["error"]
    for name in set(BOXES) - {"machine", "attention"}:
        assert status[name]["status"] == "ok", status[name]
        assert any(row["section"] == name and "status" not in row for row in rows), f"{name}: no row"


def test_sections_measure_what_they_name(tiny_run):
    rows = [row for row in read_results(tiny_run / RESULTS) if "status" not in row]
    by = {(row["section"], row.get("step") or row.get("mode") or row.get("variant") or row.get("size")): row
          for row in rows}  # fmt: skip
    assert by[("load", "cold_start")]["process_start_to_ready_s"] > 0
    t2i = by[("text_to_image", "256*256")]
    assert t2i["total_ms"] > t2i["denoise_ms"] > 0 and t2i["bare_diffusers_ms"] > 0
    # On the CPU the worker declines both options, and says so; the pixels are bf16's own.
    for variant in ("fp8", "compile"):
        start = next(row for row in rows if row["section"] == variant and row.get("table") == "start")
        assert start["applied"] is False and start["worker_start_s"] > 0
        assert by[(variant, variant)]["psnr_vs_bf16_db_min"] == "identical"
    assert by[("modes", "image_to_image")]["load_input_ms"] > 0
    assert by[("modes", "num_images 4")]["per_image_ms"] > 0
    for mode in ("inpainting", "outpainting", "lora activation", "control", "base model"):
        row = by[("modes", mode)]
        assert row["total_ms"] > row["denoise_ms"] > 0, row
    # Outpainting widens the square picture to 16:9 (rounded by size auto) at one image's price.
    first = by[("modes", "inpainting")]
    side = int(first["size"].split("*")[1])
    assert by[("modes", "outpainting")]["size"] == f"{round(side * 16 / 9) // 16 * 16}*{side}"
    assert by[("modes", "outpainting")]["cost"] == first["cost"] == 0.005
    # A random ControlNet of the 2.1 release's layout, built where the worker runs (the tiny one here).
    control = by[("modes", "control")]
    assert control["controlnet"] == "2.1, random" and control["params"] > 0 and control["build_s"] >= 0
    # The base model beside Turbo on a second random transformer: its defaults, a shared text encoder.
    base = by[("modes", "base model")]
    assert base["total_ms"] > base["denoise_ms"] > by[("modes", "text_to_image")]["denoise_ms"], base
    assert base["transformer"] == "random, Turbo's config" and base["params"] > 0
    # The step cache's levels, on Turbo and on the base that row built (skipped rows have no times).
    for mode in ("acceleration regular", "acceleration high", "base acceleration high"):
        row = by[("modes", mode)]
        assert "skipped" not in row and "error" not in row and row["denoise_ms"] > 0, row
    # The memory plans: two budgets planned by `auto`, the worst jobs on each, every plan's time.
    jobs = [row for row in rows if row["section"] == "memory" and "job" in row]
    assert {row["plan"] for row in jobs} == {"sliced", "fp8"}
    assert all(row["oom"] is False and row["estimate_gib"] > 0 and row["seconds"] > 0 for row in jobs), jobs
    timed = [row for row in rows if row["section"] == "memory" and "vs_resident" in row]
    assert [row["plan"] for row in timed] == list(PLANS) and timed[0]["vs_resident"] == 1.0
    # Upscaling: 2x and 4x of a 128x128 picture in tiles of 256, without and with a Tile ControlNet.
    ups = [row for row in rows if row["section"] == "upscaling"]
    sizes = ["128*128 -> 256*256", "128*128 -> 512*512"]
    expected = [(tile, size) for tile in (False, True) for size in sizes]
    assert [(row["tile_controlnet"], row["size"]) for row in ups] == expected
    assert [row["tiles"] for row in ups] == [1, 9, 1, 9] and all(row["refine_ms"] > 0 for row in ups), ups
    # The job loop: benchmarks/loop/job_loop.py --quick, its yardstick row, then this worker's at
    # MAX_CONCURRENCY 2 (the only run of that benchmark in the tests: it starts three processes).
    yardstick, loop = (row for row in rows if row["section"] == "job_loop")
    assert yardstick["loop"] == "bare diffusers" and yardstick["jobs_per_s"] > 0
    assert loop["loop"] == "this worker's" and loop["max_concurrency"] == 2 and loop["jobs"] == 8
    assert 0 < loop["gpu_busy_pct"] <= 100 and loop["jobs_per_s"] > 0
    assert loop["vs_bare"] == round(loop["jobs_per_s"] / yardstick["jobs_per_s"], 2)
    assert "| this worker's | 512*512 | 2 | data URI | 8 |" in (tiny_run / "job_loop.md").read_text()


def test_table_and_report_from_the_tiny_run(tiny_run, tmp_path):
    table = (tiny_run / TABLE).read_text()
    for name in BOXES:
        assert f"### {name}" in table
    benchmarks = tmp_path / "BENCHMARKS.md"
    original = (ROOT / "BENCHMARKS.md").read_text()
    benchmarks.write_text(original)
    command = [sys.executable, "benchmarks/gpu/report.py", str(tiny_run), "--benchmarks", str(benchmarks)]
    subprocess.run(command, cwd=ROOT, check=True)
    once = benchmarks.read_text()
    assert once.split(START)[0] == original.split(START)[0]  # the CPU sections are untouched
    assert once.count(START) == once.count(END) == 1
    assert "tiny run" in once and "### text_to_image" in once and "made to fail" in once
    subprocess.run(command, cwd=ROOT, check=True)
    assert benchmarks.read_text() == once


def test_report_keeps_a_cut_run_and_appends_where_no_markers_are():
    rows = [
        {"section": "run", "started_utc": "2026-01-01 00:00", "mode": "gpu", "budget_s": 480},
        {
            "section": "machine",
            "device": "NVIDIA H200",
            "memory_gib": 139.8,
            "driver": "580",
            "torch": "2.11",
        },
        {"section": "text_to_image", "size": "1024*1024", "total_ms": 700.0},  # killed before its status
    ]
    section = gpu_section(rows + [json.loads(json.dumps(rows[1]))])
    assert "NVIDIA H200, 139.8 GiB, driver 580" in section
    assert "Still running, or killed with the run" in section and "| 1024*1024 | 700.0 |" in section
    assert replace_section("# Benchmarks\n", section) == "# Benchmarks\n\n" + section + "\n"


def test_jobs_run_through_a_plain_or_a_coroutine_handle():
    """Worker.handle is becoming async: both forms work, and an async worker's lock survives jobs."""
    from benchmarks.gpu.sections import handle

    class AsyncWorker:  # the shape only: handle awaits a lock made in the loop of the first job
        lock: asyncio.Lock | None = None

        async def handle(self, job: dict) -> dict:
            self.lock = self.lock or asyncio.Lock()
            async with self.lock:
                return {"error": "bad"} if job["input"].get("fail") else {"timings": {"total": 1.0}}

    class PlainWorker:
        def handle(self, job: dict) -> dict:
            return {"timings": {"total": 2.0}}

    worker = AsyncWorker()
    assert [handle(worker, {"prompt": p})["timings"]["total"] for p in "ab"] == [1.0, 1.0]
    assert handle(PlainWorker(), {"prompt": "a"})["timings"]["total"] == 2.0
    with pytest.raises(RuntimeError, match="bad"):
        handle(worker, {"prompt": "a", "fail": True})
