"""The benchmark's first section: what machine this is, and whether the pinned packages import.

Imports nothing heavy at module level: this is the section that finds out whether diffusers,
pydantic or runpod import at all with the machine's torch, so it must run when they do not.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.bench import Config, emit, injected_fault  # noqa: E402

# What each pinned distribution is imported as; runpod only for what the worker uses.
MODULES = {
    "runpod": "runpod.serverless.utils.rp_ssrf",
    "pillow": "PIL.Image",
    "huggingface_hub": "huggingface_hub",
    "boto3": "boto3",
    "pydantic": "pydantic",
}
# Beyond requirements.txt: what the worker's options and the benchmark import.
EXTRA = {"torchao": "torchao.quantization", "worker": "src.jobs.worker", "ZImagePipeline": "diffusers"}


def gpu_facts() -> dict:
    import torch

    facts = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if not torch.cuda.is_available():
        return {"device": f"CPU ({platform.machine()})", **facts}
    props = torch.cuda.get_device_properties(0)
    facts = {"device": props.name, "memory_gib": round(props.total_memory / 2**30, 1), **facts}
    facts["cudnn"] = torch.backends.cudnn.version()
    facts["sms"] = props.multi_processor_count
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.returncode == 0:
            facts["driver"], facts["max_sm_clock"] = [
                p.strip() for p in done.stdout.splitlines()[0].split(",")
            ]
    facts["bf16_tflops"] = matmul_tflops(torch)
    return facts


def matmul_tflops(torch) -> float:
    """One 8192^3 bf16 product, timed over 10 after 3 warm-ups: a healthy H100/H200 gives ~700-800."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12)


def pinned_packages() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+).*", line)
        if match:
            pins[match[1]] = match[2]
    return pins


def import_row(name: str, module: str, pinned: str | None) -> dict:
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    start = time.perf_counter()
    try:
        imported = importlib.import_module(module)
        if name == "ZImagePipeline":
            imported.ZImagePipeline, imported.ZImageImg2ImgPipeline  # noqa: B018 (lazy attributes)
        result = "ok"
    except Exception as err:  # the point of this row: which package fails, and how
        result = f"{type(err).__name__}: {err}"
    return {
        "table": "packages",
        "package": name,
        "pinned": pinned,
        "installed": installed,
        "matches": None if pinned is None else pinned == installed,
        "import": module,
        "result": result,
        "import_ms": round((time.perf_counter() - start) * 1000),
    }


def main() -> None:
    config = Config.from_env()
    injected_fault("machine")
    emit("machine", {**gpu_facts(), "disk_free_gib": round(shutil.disk_usage(config.work).free / 2**30, 1)})
    for name, pinned in pinned_packages().items():
        emit("machine", import_row(name, MODULES.get(name, name), pinned))
    for name, module in EXTRA.items():
        emit("machine", import_row(name, module, None))


if __name__ == "__main__":
    main()
