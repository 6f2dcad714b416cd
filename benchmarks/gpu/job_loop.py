"""The benchmark's last section: the deployed job loop's busy ratio with a backlog of jobs.

That measurement belongs to `benchmarks/loop/job_loop.py` (the async job loop's own benchmark,
on a loopback stand-in for Runpod's queue); this section only runs its `--quick` form on
the tiny model and keeps each JSON line it prints as a row. Until that script
exists, the row is a named skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.bench import Config, emit, injected_fault  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "loop" / "job_loop.py"


def main() -> None:
    injected_fault("job_loop")
    if not SCRIPT.exists():
        emit("job_loop", {"skipped": "benchmarks/loop/job_loop.py does not exist yet (the async job loop)"})
        return
    # The tiny model on this device: a worker process that loaded the full-size one would spend
    # the whole box reading 20 GB, and with sub-second jobs the loop's own gaps show the most.
    out = Config.from_env().out / "job_loop.md"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--jobs", "8", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    last = "(nothing printed)"
    for line in process.stdout:  # row by row, so the section's box cutting it keeps what came
        print(line, end="", flush=True)
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            last = line.strip() or last
            continue
        emit("job_loop", row if isinstance(row, dict) else {"output": row})
    if process.wait() != 0:
        raise RuntimeError(f"benchmarks/loop/job_loop.py --quick exited {process.returncode}: {last}")


if __name__ == "__main__":
    main()
