"""A backlog's timeline as an SVG: one row per job, a bar per stage, so the overlap shows at a glance.

benchmarks/loop/job_loop.py --timeline FILE measures the backlog and calls `draw`. The stages come
from each job's own `timings` (milliseconds, in the order the job flow runs them), placed so that
the job's last stage ends when its result reached the queue. What the stages do not account for
is the wait for the GPU stage behind another job (`timings.total` includes it; the stages do not),
drawn between the fetch and the GPU stage, where the job flow waits. Written by hand as SVG text:
a picture of a few dozen rectangles needs no plotting library.
"""

from __future__ import annotations

from html import escape
from typing import NamedTuple

# Stage name on the picture -> the `timings` keys it sums, in the job flow's order.
STAGES = {
    "fetch": ("load_input", "load_loras", "preprocess_control"),
    "wait": (),  # total minus every stage: the wait for the GPU thread
    "GPU stage": ("encode_prompt", "denoise", "decode", "safety"),
    "encode": ("encode_image",),
    "upload": ("upload",),
}
COLOURS = {
    "fetch": "#4c9be8",
    "wait": "#d9d9d9",
    "GPU stage": "#e4572e",
    "encode": "#29a37a",
    "upload": "#f3a712",
}
ROW, LEFT, RIGHT, TOP, WIDTH = 22, 70, 20, 58, 960


class Span(NamedTuple):
    stage: str
    start: float  # seconds from the first job taken
    end: float


def spans(timings: dict[str, float], finished: float) -> list[Span]:
    """One job's stages as consecutive spans that end at `finished` (seconds)."""
    seconds = {name: sum(timings.get(key, 0.0) for key in keys) / 1000 for name, keys in STAGES.items()}
    seconds["wait"] = max(0.0, timings["total"] / 1000 - sum(seconds.values()))
    at = finished - sum(seconds.values())
    out = []
    for name in STAGES:
        out.append(Span(name, at, at + seconds[name]))
        at += seconds[name]
    return out


def tick_step(length: float) -> float:
    """A round step that gives at most ten ticks over `length` seconds."""
    return next(step for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if length / step <= 10)


def draw(jobs: dict[str, list[Span]], taken: dict[str, float], title: str, caption: list[str]) -> str:
    """The SVG text: `jobs` maps a label to its spans, `taken` the label to when the worker took it."""
    end = max(span.end for job in jobs.values() for span in job)
    scale = (WIDTH - LEFT - RIGHT) / end

    def x(t: float) -> float:
        return LEFT + t * scale

    height = TOP + ROW * len(jobs) + 30 + 16 * len(caption)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    legend_x = LEFT
    for name, colour in COLOURS.items():
        out.append(f'<rect x="{legend_x}" y="28" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{legend_x + 16}" y="38">{escape(name)}</text>')
        legend_x += 30 + 8 * len(name)
    out.append(f'<text x="{legend_x}" y="38" fill="#555">| taken from the queue</text>')
    bottom = TOP + ROW * len(jobs)
    step = tick_step(end)
    for i in range(int(end / step) + 1):
        t = i * step
        out.append(f'<line x1="{x(t):.1f}" y1="{TOP - 4}" x2="{x(t):.1f}" y2="{bottom}" stroke="#eee"/>')
        out.append(f'<text x="{x(t):.1f}" y="{bottom + 14}" text-anchor="middle">{t:g} s</text>')
    for row, (label, job) in enumerate(jobs.items()):
        y = TOP + row * ROW
        out.append(f'<text x="{LEFT - 8}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        out.append(f'<line x1="{x(taken[label]):.1f}" y1="{y + 2}" x2="{x(taken[label]):.1f}" '
                   f'y2="{y + ROW - 4}" stroke="#555"/>')  # fmt: skip
        for span in job:
            length = span.end - span.start
            if length > 0:
                out.append(
                    f'<rect x="{x(span.start):.1f}" y="{y + 3}" width="{length * scale:.1f}" '
                    f'height="{ROW - 8}" fill="{COLOURS[span.stage]}">'
                    f"<title>{escape(label)}: {span.stage} {1000 * length:.0f} ms</title></rect>"
                )
    for i, line in enumerate(caption):
        out.append(f'<text x="{LEFT}" y="{bottom + 34 + 16 * i}" fill="#333">{escape(line)}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"
