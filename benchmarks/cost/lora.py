"""What a LoRA costs a job, and how big the real model's adapters are.

    python benchmarks/cost/lora.py [--runs 5] [--size 512*512] [--steps 8]

On the tiny model (CPU), through the real worker: a plain job, then one LoRA job in each
state: first use (downloaded from a loopback host), cache hit (file on disk, not loaded),
already loaded. Then fuse_lora/unfuse_lora against the unfused LoRA job. Finally, the
full-size transformer built on the meta device (no memory): the size of a rank-16/32/64
adapter over the attention and feed-forward linears, and of ZIMAGE_COMPILE's three slots.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ["RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS"] = "1"  # the LoRA host is on loopback

import torch  # noqa: E402

from benchmarks.full_size import full_size_pipeline  # noqa: E402
from builder.tiny_model import build_tiny_zimage  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.lora.adapters import LoraAdapters  # noqa: E402
from src.lora.hotswap import SLOTS  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402
from tests.tiny_loras import make_lora, save_lora  # noqa: E402


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(folder: Path) -> str:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def job(worker: Worker, job_input: dict) -> dict:
    output = asyncio.run(worker.handle({"id": "bench", "input": job_input}))
    assert "error" not in output, output
    return output["timings"]


def row(name: str, timings: list[dict]) -> str:
    loras = statistics.median(t["load_loras"] for t in timings)
    denoise = statistics.median(t["denoise"] for t in timings)
    total = statistics.median(t["total"] for t in timings)
    return f"| {name} | {loras:.1f} | {denoise:.1f} | {total:.1f} |"


def tiny_costs(runs: int, size: str, steps: int) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix="zimage-lora-bench-"))
    model = build_tiny_zimage(work / "tiny-zimage")
    host = work / "host"
    for i in range(runs + 1):
        save_lora(*make_lora(model, seed=100 + i, rank=16), host / f"l{i}.safetensors", "kohya")
    url = serve(host)
    settings = Settings(model=str(model), safety_checker_model="none", lora_cache_dir=str(work / "cache"))
    worker = Worker.start(settings)
    base = {"prompt": "a lighthouse at dusk", "size": size, "seed": 1, "num_inference_steps": steps}
    job(worker, base)  # warm
    lora = lambda i: {**base, "loras": [{"path": f"{url}/l{i}.safetensors", "scale": 0.8}]}  # noqa: E731

    plain = [job(worker, base) for _ in range(runs)]
    first = [job(worker, lora(i)) for i in range(runs)]  # each a new URL: download + read + load
    cache_hit = []
    for i in range(runs):
        # A fresh set of adapters on the same files: the file is on disk, not in the transformer.
        for name in list(worker.loras.loaded):
            worker.generator.text_to_image.delete_adapters(name)
        worker.models["z-image-turbo"].loras = LoraAdapters(
            worker.generator.text_to_image, worker.loras.files, 6
        )
        cache_hit.append(job(worker, lora(i)))
    loaded = [job(worker, lora(runs - 1)) for _ in range(runs)]

    pipe = worker.generator.text_to_image
    fuse_ms, unfuse_ms = [], []
    for _ in range(runs):
        started = time.perf_counter()
        pipe.fuse_lora(lora_scale=1.0)
        fuse_ms.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        pipe.unfuse_lora()
        unfuse_ms.append((time.perf_counter() - started) * 1000)
    size_kb = (host / "l0.safetensors").stat().st_size / 1024
    return [
        f"Tiny model (CPU), {size}, {steps} steps, one rank-16 LoRA ({size_kb:.0f} KiB, kohya layout) at "
        f"scale 0.8 on every attention and feed-forward linear; medians of {runs} jobs, ms:",
        "",
        "| job | load_loras | denoise | total |",
        "| --- | --- | --- | --- |",
        row("plain (no LoRA)", plain),
        row("LoRA, first use (download + check + read + load)", first),
        row("LoRA, cache hit (read + load)", cache_hit),
        row("LoRA, already loaded", loaded),
        "",
        f"fuse_lora {statistics.median(fuse_ms):.1f} ms, unfuse_lora {statistics.median(unfuse_ms):.1f} ms "
        "(one adapter, tiny model).",
    ]


def adapter_sizes() -> list[str]:
    pipe = full_size_pipeline("meta")
    names = {"to_q", "to_k", "to_v", "w1", "w2", "w3"}
    linears = [
        (name, module)
        for name, module in pipe.transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (name.rsplit(".", 1)[-1] in names or name.endswith("to_out.0"))
    ]
    every = [m for _, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    base = sum(m.in_features * m.out_features for _, m in linears)
    lines = [
        f"Full-size transformer (meta device): {len(linears)} attention and feed-forward linears "
        f"({base / 1e9:.2f}B weights); a LoRA adds rank x (in + out) per linear:",
        "",
        "| rank | parameters | bf16 file / GPU memory | extra FLOPs per token vs those linears |",
        "| --- | --- | --- | --- |",
    ]
    for rank in (16, 32, 64, 128):
        params = sum(rank * (m.in_features + m.out_features) for _, m in linears)
        lines.append(f"| {rank} | {params / 1e6:.1f}M | {params * 2 / 2**20:.0f} MiB | {params / base:.2%} |")
    slots = sum(64 * (m.in_features + m.out_features) for m in every) * len(SLOTS)
    lines += [
        "",
        f"ZIMAGE_COMPILE=1 slots: {len(SLOTS)} x rank 64 on all {len(every)} linears = "
        f"{slots / 1e6:.0f}M parameters, {slots * 2 / 2**30:.2f} GiB in bf16.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", default="512*512")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    print("\n".join(tiny_costs(args.runs, args.size, args.steps) + [""] + adapter_sizes()))


if __name__ == "__main__":
    main()
