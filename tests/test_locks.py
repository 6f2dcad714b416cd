"""The locks: every installed package pinned with hashes, written by scripts/lock.sh from the
top-level requirements, and installed by set-up and the Docker image exactly as locked.

The fresh-venv test downloads from PyPI on its first run (pip's cache serves later ones);
torch's CPU build comes from where scripts/torch-cpu-source.sh says.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks.gpu.wheels import FP8
from tests.conftest import ROOT

LOCKS = ROOT / "locks"
# Which top-level files each lock is resolved from.
SOURCES = {
    "dev-cpu.txt": ("requirements.txt", "requirements-dev.txt"),
    "worker-cpu.txt": ("requirements.txt",),
    "worker-cuda.txt": ("requirements.txt",),
    "fp8-cuda.txt": ("requirements-fp8.txt",),  # the image's torchao, installed apart (Dockerfile)
}
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+?)(?: \\)?$")


def top_level(*files: str) -> dict[str, Requirement]:
    """The requirements the files name (following -r), by canonical name."""
    found = {}
    for file in files:
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                requirement = Requirement(line)
                found[canonicalize_name(requirement.name)] = requirement
    return found


def locked(lock: str) -> dict[str, dict]:
    """Each pinned package: its version, its hashes, and what the annotations say it is there for."""
    packages: dict[str, dict] = {}
    current = None
    for line in (LOCKS / lock).read_text().splitlines():
        if match := PIN.match(line):
            current = packages[canonicalize_name(match[1])] = {"version": match[2], "hashes": [], "via": []}
        elif current and line.strip().startswith("--hash=sha256:"):
            current["hashes"].append(line.strip())
        elif current and line.strip().startswith("#"):
            current["via"].append(line.strip("# ").removeprefix("via").strip())
    return packages


@pytest.mark.parametrize("lock", sorted(SOURCES))
def test_every_top_level_requirement_is_locked_at_its_version(lock):
    packages = locked(lock)
    for name, requirement in top_level(*SOURCES[lock]).items():
        assert name in packages, f"{lock} lacks {name}: run bash scripts/lock.sh"
        version = packages[name]["version"]
        assert requirement.specifier.contains(version), (
            f"{lock} pins {name}=={version}, {requirement} is asked for: run bash scripts/lock.sh"
        )


@pytest.mark.parametrize("lock", sorted(SOURCES))
def test_nothing_is_locked_as_a_requirement_that_none_asks_for(lock):
    """A requirement removed without re-locking leaves its pin annotated 'via -r <file>'."""
    claimed = {
        name
        for name, package in locked(lock).items()
        if any(re.fullmatch(r"-r requirements(-dev|-fp8)?\.txt", via) for via in package["via"])
    }
    assert claimed == set(top_level(*SOURCES[lock])), "run bash scripts/lock.sh"


@pytest.mark.parametrize("lock", sorted(SOURCES))
def test_every_pin_carries_its_hashes(lock):
    packages = locked(lock)
    assert len(packages) > 100 or lock == "fp8-cuda.txt"  # torchao alone: it has no dependency
    for name, package in packages.items():
        assert package["hashes"], f"{lock}: {name} has no hash"


def test_the_locks_agree_on_every_version_they_share():
    """The worker's locks are resolved under the dev lock's pins: what the tests run is what ships.
    Only torch differs, by its build (+cpu here, CUDA 13 in the image)."""
    dev, cpu, cuda = (locked(lock) for lock in ("dev-cpu.txt", "worker-cpu.txt", "worker-cuda.txt"))
    assert set(cpu) <= set(dev)
    for other in (cpu, cuda):
        for name in set(other) & set(dev):
            if name != "torch":
                assert other[name]["version"] == dev[name]["version"], name
    assert dev["torch"]["version"] == cpu["torch"]["version"] == "2.13.0+cpu"
    assert cuda["torch"]["version"] == "2.13.0"
    # The CUDA lock adds only the GPU's own packages (CUDA libraries, triton) to the worker's.
    gpu_only = {name for name in set(cuda) - set(cpu) if not name.startswith(("nvidia-", "cuda-"))}
    assert gpu_only <= {"triton"}
    # The image's torchao (ZIMAGE_PRECISION=fp8), installed apart, is the pin the GPU bench carries.
    assert {name: p["version"] for name, p in locked("fp8-cuda.txt").items()} == FP8


def test_the_venv_holds_exactly_the_dev_lock():
    """After set-up: `pip list --format=freeze` against the lock, nothing unpinned or different."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    )
    installed = {}
    for line in done.stdout.splitlines():
        name, _, version = line.partition("==")
        installed[canonicalize_name(name)] = version
    pins = {name: package["version"] for name, package in locked("dev-cpu.txt").items()}
    assert {n: v for n, v in installed.items() if pins.get(n) != v} == {}, "unpinned or different"
    assert set(pins) == set(installed), f"locked but not installed: {sorted(set(pins) - set(installed))}"


def test_everything_installs_from_the_locks():
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert re.search(r"pip install --quiet --require-hashes --no-deps -r locks/dev-cpu\.txt", setup)
    assert "-r requirements" not in setup
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes --no-deps -r /tmp/worker-cuda.txt" in dockerfile
    assert "COPY locks/worker-cuda.txt /tmp/worker-cuda.txt" in dockerfile
    assert "worker-cuda.txt" in (ROOT / "benchmarks/gpu/wheels.py").read_text()


def test_the_lock_script_writes_every_lock_from_the_top_level_files():
    script = (ROOT / "scripts/lock.sh").read_text()
    for lock in SOURCES:
        assert f"-o locks/{lock}" in script
    for lock in SOURCES:
        header = (LOCKS / lock).read_text().splitlines()[:2]
        assert header == [
            "# This file was autogenerated by uv via the following command:",
            "#    bash scripts/lock.sh",
        ]
    assert "/tmp/" not in "".join((LOCKS / lock).read_text() for lock in SOURCES)


def test_the_worker_lock_installs_into_a_fresh_venv_and_imports_the_worker(tmp_path):
    """The Docker image's install step, as far as this machine allows: the worker lock with the
    CPU build of torch (the only difference from locks/worker-cuda.txt) into a new venv, then
    `import handler` and pip's own consistency check there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    source = subprocess.run(
        ["bash", "scripts/torch-cpu-source.sh"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    # --no-compile: writing bytecode for every file of torch was most of this test's time (25 s
    # without it, 105 s with it on a busy machine); which files install is the same.
    install = [*pip, "install", "--quiet", "--no-compile", "--require-hashes", "--no-deps"]
    install += ["-r", "locks/worker-cpu.txt"]
    done = subprocess.run([*install, *source], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    imported = subprocess.run(
        [str(python), "-c", "import handler, src.jobs.worker, torch; print(torch.__version__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip() == "2.13.0+cpu"
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True)
    names = {canonicalize_name(line.partition("==")[0]) for line in listed.stdout.splitlines()}
    assert names == set(locked("worker-cpu.txt"))
