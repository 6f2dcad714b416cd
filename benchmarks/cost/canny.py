"""Canny edges of a 1024x1024 picture on this CPU: kornia (torch tensors) against OpenCV headless.

Run from the repository root, with both libraries importable:

    python benchmarks/cost/canny.py

Medians of 15 runs after 3 warm-ups, each library at its defaults for an RGB picture as the
worker receives it (uint8 HxWx3), edges back as uint8. One torch thread per core, as the worker runs.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

SIDE = 1024
RUNS, WARM = 15, 3


def picture() -> np.ndarray:
    # Shapes with edges, plus noise: Canny's cost depends on how much it finds.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:SIDE, :SIDE]
    base = ((x // 128 + y // 128) % 2 * 160 + ((x - 512) ** 2 + (y - 512) ** 2 < 300**2) * 60).astype(
        np.uint8
    )
    noisy = base[..., None] + rng.integers(0, 30, (SIDE, SIDE, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def median_ms(fn) -> float:
    for _ in range(WARM):
        fn()
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    import cv2
    import kornia

    rgb = picture()

    def with_opencv() -> np.ndarray:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return cv2.Canny(grey, 100, 200)

    def with_kornia() -> np.ndarray:
        tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
        _, edges = kornia.filters.canny(tensor, low_threshold=0.1, high_threshold=0.2)
        return (edges[0, 0] * 255).to(torch.uint8).numpy()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; cv2 {cv2.__version__}, "
        f"kornia {kornia.__version__}; {SIDE}x{SIDE} RGB"
    )
    print(f"opencv cv2.Canny:        {median_ms(with_opencv):8.1f} ms (median of {RUNS})")
    print(f"kornia filters.canny:    {median_ms(with_kornia):8.1f} ms (median of {RUNS})")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
