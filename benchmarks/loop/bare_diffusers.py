"""The yardstick for the deployed loop: diffusers' own ZImagePipeline called back to back.

    python benchmarks/loop/bare_diffusers.py --model FOLDER --size 512*512 --jobs 16

What a user would write without this worker: load the pipeline once, then one call per image
(a new prompt and seed each time, PIL images out), in a fresh process of its own so that no
other thread has run torch in it. It does no PNG encoding, no upload and no job loop; one
call first as a warm-up, as the worker warms up before taking jobs. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

# The cyclic GC paused while torch and diffusers import (as handler.py does): it would walk their
# half a million new objects again and again, about a fifth of the import time.
gc.disable()
import torch  # noqa: E402
from diffusers import ZImagePipeline  # noqa: E402

gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--size", default="512*512")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = ZImagePipeline.from_pretrained(args.model, dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    width, height = (int(side) for side in args.size.split("*"))

    def one(i: int) -> None:
        pipe(
            prompt=f"a harbour at dawn, take {i}",
            width=width,
            height=height,
            num_inference_steps=args.steps,
            guidance_scale=0.0,
            generator=torch.Generator(device).manual_seed(i),
        ).images[0].load()  # a PIL image the caller can use
        if device == "cuda":
            torch.cuda.synchronize()

    one(-1 % 2**32)
    start = time.perf_counter()
    for i in range(args.jobs):
        one(i)
    wall = time.perf_counter() - start
    print(json.dumps({"size": args.size, "jobs": args.jobs, "wall_s": wall, "jobs_per_s": args.jobs / wall}))


if __name__ == "__main__":
    main()
