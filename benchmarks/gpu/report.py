"""Turn a GPU run's results into BENCHMARKS.md's GPU section.

    python benchmarks/gpu/report.py DIR [--benchmarks BENCHMARKS.md]

DIR holds `gpu-results.jsonl` from `bash benchmarks/gpu.sh` (fetched from the GPU machine's
$OUT). Only the text between the two markers below is replaced; where BENCHMARKS.md has no
markers yet, the section is appended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
START = "<!-- gpu-bench:start -->"
END = "<!-- gpu-bench:end -->"


def read_results(path: Path) -> list[dict[str, Any]]:
    """Every complete line; a line cut by a killed run is dropped, not fatal."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        value = f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def table(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [key for key in row if key not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    return lines + ["| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in rows]


def section_markdown(rows: list[dict[str, Any]], level: str = "###") -> str:
    """One heading per section with how it ended, then its rows as tables (one per `table` key)."""
    out: list[str] = []
    for name in dict.fromkeys(row["section"] for row in rows if row["section"] != "run"):
        mine = [row for row in rows if row["section"] == name]
        status = next((row for row in mine if "status" in row), None)
        out += [f"{level} {name}", ""]
        if status is None:
            out += ["Still running, or killed with the run: the rows below are what it measured.", ""]
        else:
            text = f"{status['status']}" + (
                f" in {status['seconds']} s of a {status['box_s']} s box" if "seconds" in status else ""
            )
            out += [text + (f": {status['error']}" if status.get("error") else ""), ""]
        data = [{k: v for k, v in row.items() if k != "section"} for row in mine if "status" not in row]
        for name_of_table in dict.fromkeys(row.get("table", "") for row in data):
            part = [
                {k: v for k, v in row.items() if k != "table"}
                for row in data
                if row.get("table", "") == name_of_table
            ]
            out += ([f"{name_of_table}:", ""] if name_of_table else []) + table(part) + [""]
    return "\n".join(out)


def results_markdown(path: Path) -> str:
    rows = read_results(path)
    run = next((row for row in rows if row["section"] == "run"), {})
    header = [f"# GPU benchmark, {run.get('mode', '?')} run started {run.get('started_utc', '?')} UTC", ""]
    return "\n".join(header) + "\n" + section_markdown(rows)


MODEL_LINES = {
    "gpu": "the full-size architecture from the real configs with random bf16 weights: the real model's "
    "speed, not its pictures",
    "tiny": "the tiny CPU model (builder/tiny_model.py): these figures check the benchmark, not the GPU",
}


def gpu_section(rows: list[dict[str, Any]]) -> str:
    """BENCHMARKS.md's GPU section: the machine and date first, then every section's tables."""
    run = next((row for row in rows if row["section"] == "run"), {})
    machine = [row for row in rows if row["section"] == "machine" and "device" in row]
    gpu = {key: "?" for key in ("device", "memory_gib", "driver", "torch", "cuda", "python")}
    gpu.update(machine[0] if machine else {})
    mode = run.get("mode", "?")
    lines = [
        START,
        "## GPU figures",
        "",
        f"- date: {run.get('started_utc', '?')} UTC ({mode} run, budget {run.get('budget_s', '?')} s)",
        f"- device: {gpu['device']}, {gpu['memory_gib']} GiB, driver {gpu['driver']}",
        f"- torch {gpu['torch']}, CUDA {gpu['cuda']}, Python {gpu['python']}",
        "- command: `bash benchmarks/gpu.sh`, then `python benchmarks/gpu/report.py DIR` "
        "(docs/performance.md); medians of the timed jobs after a warm-up job, milliseconds unless stated",
        f"- model: {MODEL_LINES.get(mode, mode)}",
        "",
        section_markdown(rows, level="###"),
        END,
    ]
    return "\n".join(lines)


def replace_section(document: str, section: str) -> str:
    if START in document and END in document:
        before, rest = document.split(START, 1)
        return before + section + rest.split(END, 1)[1]
    return document.rstrip("\n") + "\n\n" + section + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="the folder holding gpu-results.jsonl")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    rows = read_results(args.results / "gpu-results.jsonl")
    if not rows:
        raise SystemExit(f"{args.results / 'gpu-results.jsonl'}: no results there")
    args.benchmarks.write_text(replace_section(args.benchmarks.read_text(), gpu_section(rows)))
    print(f"wrote the GPU section of {args.benchmarks}")


if __name__ == "__main__":
    main()
