"""The one way a CPU benchmark writes its results file (benchmarks/results/*.md).

A results file is read months later beside others from other machines, so each one opens the
same way: a title, the date, the machine, the load average and the command that made it; then
what the figures mean, then the tables. The load average is there because these runs share a
small machine: it says more about a figure's noise than the CPU's name does.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine() -> str:
    """Architecture, cores, Python and, when the benchmark uses torch, its version and threads."""
    parts = [f"{platform.machine()} CPU, {os.cpu_count()} cores", f"Python {platform.python_version()}"]
    torch = sys.modules.get("torch")  # only what the benchmark itself imported: no import here
    if torch is not None:
        parts.append(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    return ", ".join(parts)


def command() -> str:
    """This process's command line, as a reader would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT.parent).as_posix() if script.is_relative_to(ROOT.parent) else sys.argv[0]
    return shlex.join(["python", shown, *sys.argv[1:]])


def table(rows: list[dict]) -> list[str]:
    """Rows of the same keys as a markdown table, the keys as its header."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    return lines + ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]


def header(
    title: str, facts: list[str], *, load_at_start: float | None = None, host: str | None = None
) -> list[str]:
    """`# title`, then date, machine, load average, the facts given (one list item each) and the command."""
    end = load_average()
    load = [
        f"{value:.1f} at the {when}"
        for value, when in ((load_at_start, "start"), (end, "end"))
        if value is not None
    ]
    lines = [
        f"# {title}",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {host or machine()}",
    ]
    if load:
        lines.append(f"- load average (1 minute): {', '.join(load)}")
    return lines + [f"- {fact}" for fact in facts] + [f"- command: `{command()}`", ""]


def write(out: Path, lines: list[str]) -> str:
    """Write the file (making its folder) and return its text, which the benchmark also prints."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text
