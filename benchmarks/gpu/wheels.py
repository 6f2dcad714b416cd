"""The wheels a bare GPU machine lacks for the benchmark, fetched here and installed there.

    python benchmarks/gpu/wheels.py prepare .whl          # on a machine that reaches PyPI
    python benchmarks/gpu/wheels.py install .whl /tmp/site  # on the GPU machine, offline

The GPU machine has torch, transformers, huggingface_hub, accelerate, safetensors, numpy,
pillow, requests and aiohttp, but not diffusers, pydantic, runpod or boto3. Each wheel is
for CPython 3.12 on manylinux x86_64 and installs with --no-deps into a --target folder put
on PYTHONPATH, so the machine's own torch is never replaced. Only what importing the worker
and the benchmark really needs is named (measured with sys.modules, not Requires-Dist):
runpod declares fastapi, watchdog, inquirerpy and more that `rp_ssrf` never imports.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Versions come from the Docker image's lock, so the benchmark runs what the image installs.
LOCK = ROOT / "locks" / "worker-cuda.txt"
NEEDED = (
    "diffusers",
    "pydantic",
    "runpod",
    "boto3",
    # pydantic's parts; pydantic 2.14 needs a typing-extensions newer than many images have.
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "typing-extensions",
    # `import runpod` (even for rp_ssrf alone) runs its __init__, which imports the API
    # client, the CLI's config and its SSH helper (paramiko) as well.
    "aiohttp-retry",
    "backoff",
    "tomli",
    "tomlkit",
    "tqdm-loggable",
    "paramiko",
    "cryptography",
    "bcrypt",
    "pynacl",
    "cffi",
    "invoke",
    # src/delivery/storage.py imports boto3 at module level, so the worker needs it even without a
    # bucket; botocore is half of this folder's size.
    "botocore",
    "s3transfer",
    "jmespath",
)
# Not in the worker's locks: installed, torchao is imported by diffusers' and transformers'
# quantizer checks on every `import` (0.3 s and a screen of warnings on a CPU), and only
# ZIMAGE_PRECISION=fp8 uses it. The GPU benchmark's fp8 row carries it; this is its one pin.
# 0.18 is the first release whose C++ parts target torch 2.11.
FP8 = {"torchao": "0.18.0"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_26_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")  # fmt: skip
# 64 MiB travel to the GPU machine, the working tree included; keep room for it.
MAX_MIB = 48


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(lock: Path = LOCK) -> dict[str, str]:
    """Every package `lock` pins, name -> version."""
    pins = {}
    for line in lock.read_text().splitlines():
        if match := re.match(r"([A-Za-z0-9_.-]+)==([^\s;\\]+)", line):
            pins[normalise(match[1])] = match[2]
    return pins


def pinned() -> dict[str, str]:
    """Every wheel the GPU machine needs, name -> version, as the Docker image's lock pins it."""
    pins = locked()
    missing = sorted(set(NEEDED) - set(pins))
    if missing:
        raise SystemExit(f"{LOCK.relative_to(ROOT)} pins none of {missing}: add them and re-lock")
    return {**{name: pins[name] for name in NEEDED}, **FP8}


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def prepare(folder: Path) -> None:
    """Download the wheels into `folder`, drop any other file there, and report the size."""
    folder.mkdir(parents=True, exist_ok=True)
    pins = pinned()
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platforms, "--dest", str(folder),
         *(f"{name}=={version}" for name, version in pins.items())],
        check=True,
    )  # fmt: skip
    # Two versions of one package stop the whole install there: keep only the pinned ones.
    wanted = {(name, version) for name, version in pins.items()}
    for path in folder.iterdir():
        if path.suffix != ".whl" or wheel_name_version(path) not in wanted:
            path.unlink()
    wheels = sorted(folder.glob("*.whl"), key=lambda p: p.stat().st_size)
    found = {wheel_name_version(p)[0] for p in wheels}
    if found != set(pins):
        raise SystemExit(f"no wheel for {sorted(set(pins) - found)} in {folder}")
    total = sum(p.stat().st_size for p in wheels) / 2**20
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"{total:7.2f} MiB  in {len(wheels)} wheels, {folder}")
    if total > MAX_MIB:
        raise SystemExit(f"{folder} holds {total:.1f} MiB, over the {MAX_MIB} MiB this folder may take")


def install(folder: Path, site: Path) -> None:
    """Install into `site` each wheel whose package is absent, or present at another version."""
    needed = []
    for path in sorted(folder.glob("*.whl")):
        name, version = wheel_name_version(path)
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            needed.append(path)
            print(f"install {name} {version} (found {have or 'none'})")
    if needed:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, needed)],
            check=True,
        )  # fmt: skip
    print(f"{len(needed)} wheel(s) installed into {site}; the others were there already")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("folder", type=Path)
    installing = sub.add_parser("install")
    installing.add_argument("folder", type=Path)
    installing.add_argument("site", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.folder)
    else:
        install(args.folder, args.site)


if __name__ == "__main__":
    main()
