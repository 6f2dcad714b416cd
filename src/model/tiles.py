"""Upscaling's views: the tile layout over the canvas latent and the weights that blend the tiles.

Pure functions of the canvas size and UPSCALE_TILE, computed once per job before denoising, as
diffusers' panorama pipeline (MultiDiffusion) computes its views. Everything is in latent units
(pixels / the VAE's scale); windows start and end on multiples of `step` (the transformer's patch),
so every tile is a size the transformer takes.

Along each side the windows are as few as cover it with at least MIN_OVERLAP of a tile shared
between neighbours, spread evenly (so the real overlaps are often larger). Each window's weight
ramps linearly across the parts it shares with a neighbour and is 1 elsewhere (and at the canvas's
own edges); the weights are then divided by their sum at every position, so they add up to 1
everywhere and a blended prediction is an average of the tiles' predictions, with no seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_OVERLAP = 0.25  # of a tile: the least that neighbouring tiles share


@dataclass(frozen=True)
class View:
    """One tile: its window in the canvas latent (rows top..top+height, columns left..left+width)."""

    top: int
    left: int
    height: int
    width: int

    def of(self, canvas: torch.Tensor) -> torch.Tensor:
        """The window of a (..., H, W) tensor."""
        return canvas[..., self.top : self.top + self.height, self.left : self.left + self.width]


def spans(length: int, tile: int, step: int) -> list[tuple[int, int]]:
    """Windows (start, end) of at most `tile` covering 0..`length`, neighbours sharing MIN_OVERLAP."""
    if length <= tile:
        return [(0, length)]
    overlap = math.ceil(tile * MIN_OVERLAP / step) * step
    count = math.ceil((length - overlap) / (tile - overlap))
    stride = (length - tile) / (count - 1)
    starts = [round(i * stride / step) * step for i in range(count)]
    return [(start, start + tile) for start in starts]


def views(height: int, width: int, tile: int, step: int) -> list[View]:
    """The tiles of a `height` x `width` canvas latent, row by row."""
    return [
        View(top, left, bottom - top, right - left)
        for top, bottom in spans(height, tile, step)
        for left, right in spans(width, tile, step)
    ]


def _ramp(windows: list[tuple[int, int]], index: int) -> torch.Tensor:
    """Window `index`'s weight along one side: up across what it shares with the previous window,
    down across what it shares with the next, 1 elsewhere; never 0 (every position is covered)."""
    start, end = windows[index]
    length = end - start
    position = torch.arange(length, dtype=torch.float64) + 0.5
    ramp = torch.ones(length, dtype=torch.float64)
    if index > 0 and windows[index - 1][1] > start:
        shared = windows[index - 1][1] - start
        ramp = torch.minimum(ramp, position / shared)
    if index + 1 < len(windows) and windows[index + 1][0] < end:
        shared = end - windows[index + 1][0]
        ramp = torch.minimum(ramp, (length - position) / shared)
    return ramp


def weights(height: int, width: int, tile: int, step: int) -> list[torch.Tensor]:
    """Each view's blend weights (its height x its width, float32), in the order of `views`;
    at every position of the canvas the weights of the views covering it sum to 1."""
    rows, columns = spans(height, tile, step), spans(width, tile, step)
    raw = [
        torch.outer(_ramp(rows, i), _ramp(columns, j)) for i in range(len(rows)) for j in range(len(columns))
    ]
    total = torch.zeros(height, width, dtype=torch.float64)
    for view, weight in zip(views(height, width, tile, step), raw, strict=True):
        view.of(total).add_(weight)
    return [
        (weight / view.of(total)).float()
        for view, weight in zip(views(height, width, tile, step), raw, strict=True)
    ]
