"""What inpainting costs on top of image-to-image, through the worker's own job path.

    .venv/bin/python benchmarks/cost/inpaint.py [--runs 7] [--machine "2-core CPU sandbox"] [--out FILE]

Both jobs take the same 1024x1024 photo-like picture, strength 0.8, 8 steps, PNG, checker off;
the inpainting job adds a mask (left half kept, right half regenerated). The jobs alternate,
so a busy machine slows both alike; each figure is the median of --runs jobs after one
warm-up job of each, read from the `timings` a caller sees. The composite alone is timed on
the same tensors. Then the saving of src/model/inpaint.py's InpaintPipeline: diffusers' own
ZImageInpaintPipeline and the worker's, called alternately on the same components, picture, mask
and seed (output_type "latent", so the same work as the job's denoise stage), checked to give the
same latents; and one VAE encode of the picture alone, which is what the worker skips.
On a CPU it uses the tiny model of builder/tiny_model.py (--model: another).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import ZImageInpaintPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import results_file  # noqa: E402
from benchmarks.run import PROMPT, photo_like, run_job  # noqa: E402
from builder.tiny_model import build_tiny_zimage  # noqa: E402
from src.inputs.pictures import Inputs  # noqa: E402
from src.jobs.worker import Worker  # noqa: E402
from src.model.inpaint import composite  # noqa: E402
from src.runtime.settings import Settings  # noqa: E402
from tests.conftest import data_uri_of  # noqa: E402

SIDE = 1024
STAGES = ("load_input", "encode_prompt", "denoise", "decode", "encode_image", "total")


def png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri_of(buffer.getvalue())


def half_mask() -> Image.Image:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[:, SIDE // 2 :] = 255
    return Image.fromarray(mask)


def job_timings(worker: Worker, runs: int) -> dict[str, list[dict[str, float]]]:
    """Each mode's `timings`, take by take; take i of both modes ran back to back."""
    picture, mask = photo_like(SIDE), half_mask()
    base = {"image": png_uri(picture), "size": f"{SIDE}*{SIDE}", "strength": 0.8}
    jobs = {"image-to-image": base, "inpainting": {**base, "mask": png_uri(mask)}}
    samples: dict[str, list[dict]] = {name: [] for name in jobs}
    for job in jobs.values():
        run_job(worker, "warm", {**job, "prompt": PROMPT, "seed": 0})
    for i in range(runs):
        for name, job in jobs.items():
            # A new prompt for every job, so neither mode reads the other's cached embedding.
            prompt = f"{PROMPT}, {name}, take {i}"
            timings = run_job(worker, f"{name}-{i}", {**job, "prompt": prompt, "seed": i})["timings"]
            samples[name].append(timings)
    return samples


def composite_ms(device: torch.device, runs: int) -> float:
    inputs = Inputs(photo_like(SIDE), half_mask())
    generated = torch.rand(1, 3, SIDE, SIDE, device=device)
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        composite(generated, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times[1:]), 1)


def pipeline_ms(worker: Worker, runs: int) -> dict[str, float]:
    """diffusers' inpainting call against the worker's, alternating, after one warm-up call of each."""
    ours = worker.generator.pipelines["inpainting"]
    stock = ZImageInpaintPipeline(**ours.components)
    stock.set_progress_bar_config(disable=True)
    device = worker.generator.device
    picture, mask = photo_like(SIDE), half_mask()
    embeds = worker.generator.prompts.embed(PROMPT)

    def call(pipe: ZImageInpaintPipeline, seed: int) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        latents = pipe(
            prompt_embeds=[embeds],
            image=[picture],
            mask_image=mask,
            strength=0.8,
            height=SIDE,
            width=SIDE,
            num_inference_steps=8,
            guidance_scale=0.0,
            generator=[torch.Generator(device).manual_seed(seed)],
            output_type="latent",
        ).images
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000, latents

    samples: dict[str, list[float]] = {"diffusers": [], "worker": []}
    for i in range(runs + 1):
        (stock_ms, expected), (ours_ms, got) = call(stock, i), call(ours, i)
        if not torch.equal(expected, got):
            raise SystemExit(f"take {i}: the worker's inpainting latents differ from diffusers'")
        if i:  # take 0 warms both up
            samples["diffusers"].append(stock_ms)
            samples["worker"].append(ours_ms)
    encode = []
    pixels = ours.image_processor.preprocess(picture, height=SIDE, width=SIDE).to(device, ours.vae.dtype)
    with torch.inference_mode():
        for _ in range(runs + 1):
            start = time.perf_counter()
            ours.vae.encode(pixels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            encode.append((time.perf_counter() - start) * 1000)
    paired = [a - b for a, b in zip(samples["diffusers"], samples["worker"], strict=True)]
    return {
        "diffusers_ms": median(samples["diffusers"]),
        "worker_ms": median(samples["worker"]),
        "saved_ms": median(paired),
        "saved_min_ms": round(min(paired), 1),
        "saved_max_ms": round(max(paired), 1),
        "one_vae_encode_ms": median(encode[1:]),
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def report(
    samples: dict[str, list[dict[str, float]]],
    blend_ms: float,
    host: str | None,
    model: str,
    runs: int,
    load: float | None,
    saving: dict[str, float],
) -> str:
    lines = [
        "| mode | " + " | ".join(STAGES) + " | total, fastest..slowest |",
        "| --- |" + " ---: |" * (len(STAGES) + 1),
    ]
    for name, rows in samples.items():
        totals = [row["total"] for row in rows]
        cells = [str(median([row[stage] for row in rows])) for stage in STAGES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {min(totals):.0f}..{max(totals):.0f} |")
    # Paired: take i of both modes ran back to back, so a load change hits both alike.
    pairs = list(zip(samples["image-to-image"], samples["inpainting"], strict=True))
    extra = {stage: median([b[stage] - a[stage] for a, b in pairs]) for stage in STAGES}
    lines.append(
        "| extra (median of paired differences) | " + " | ".join(str(extra[s]) for s in STAGES) + " | |"
    )
    share = 100 * extra["total"] / median([a["total"] for a, _ in pairs])
    facts = [
        f"model: {model}, on {'cuda' if torch.cuda.is_available() else 'cpu'}",
        f"job: {SIDE}x{SIDE} photo-like input, strength 0.8, 8 steps, PNG, checker off; "
        "inpainting adds a mask with the right half white; medians of "
        f"{runs} alternating jobs of each after one warm-up each (ms, the response's `timings`)",
    ]
    header = results_file.header(
        "Inpainting cost against image-to-image", facts, load_at_start=load, host=host
    )
    return "\n".join(
        [
            *header,
            *lines,
            "",
            f"Inpainting costs {extra['total']:+.1f} ms per job ({share:+.1f}% of image-to-image). "
            f"The composite alone takes {blend_ms} ms at {SIDE}x{SIDE} (median of {runs}). What else the "
            "inpainting pipeline does: a latent blend at every step, and decoding the mask. A stage "
            "difference smaller than the spread of the totals is noise on a shared machine.",
            "",
            "## The skipped masked-image encode (src/model/inpaint.py's InpaintPipeline)",
            "",
            f"diffusers' ZImageInpaintPipeline against the worker's, {SIDE}x{SIDE}, strength 0.8, 8 steps, "
            f"one image, output_type latent, alternating, medians of {runs} after a warm-up call of each; "
            "the latents were checked equal (torch.equal) on every take.",
            "",
            "| diffusers' call | the worker's | saved (paired median) | saved, range | one VAE encode |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {saving['diffusers_ms']} | {saving['worker_ms']} | {saving['saved_ms']} | "
            f"{saving['saved_min_ms']}..{saving['saved_max_ms']} | {saving['one_vae_encode_ms']} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--model", help="an existing model folder (default: build the tiny one)")
    parser.add_argument("--machine", help="how the results name the machine (default: detected)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/inpaint_cost.md")
    args = parser.parse_args()
    model = Path(args.model) if args.model else build_tiny_zimage(Path(tempfile.mkdtemp()) / "tiny-zimage")
    worker = Worker.start(Settings(model=str(model), safety_checker_model="none"))
    before = results_file.load_average()
    samples = job_timings(worker, args.runs)
    blend_ms = composite_ms(worker.generator.device, args.runs)
    saving = pipeline_ms(worker, args.runs)
    kind = args.model or "the tiny model (builder/tiny_model.py)"
    text = report(samples, blend_ms, args.machine, kind, args.runs, before, saving)
    results_file.write(args.out, [text])
    print(text)


if __name__ == "__main__":
    main()
