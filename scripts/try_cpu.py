"""Run one job through `python handler.py` and save the pictures it made (scripts/try-cpu.sh).

The worker runs as a load-balancing server (ENDPOINT_TYPE=lb) on a free loopback port: the job
(test_input.json, or `--test_input '{"input": {...}}'`) goes to its /runsync, each returned image
is written under outputs/try-cpu/ and its path printed; the worker is then stopped with SIGTERM.
Exit status 0 when the job completed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 600  # the real weights on a CPU take minutes; the tiny model seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save(output: dict, folder: Path, job_id: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, entry in enumerate(output.get("images", [output])):
        header, _, payload = entry["image_url"].partition(",")
        if not header.startswith("data:"):  # a bucket's link: nothing to decode
            print(entry["image_url"])
            continue
        path = folder / f"{job_id}-{i}.{output['output_format']}"
        path.write_bytes(base64.b64decode(payload))
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test_input", help='a job, {"input": {...}}; default: test_input.json')
    parser.add_argument("--out", default=str(ROOT / "outputs" / "try-cpu"), help="where the images go")
    args = parser.parse_args()
    job = (
        json.loads(args.test_input) if args.test_input else json.loads((ROOT / "test_input.json").read_text())
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ENDPOINT_TYPE": "lb", "PORT": str(port), "PORT_HEALTH": str(port)}
    worker = subprocess.Popen([sys.executable, "handler.py"], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if worker.poll() is not None:
                print(f"the worker exited with {worker.returncode} before it was ready", file=sys.stderr)
                return 1
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                print(f"the worker was not ready after {START_SECONDS} s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        answer = requests.post(f"{url}/runsync", json=job, timeout=3600)
        reply = answer.json()
        if reply.get("status") != "COMPLETED":
            print(f"HTTP {answer.status_code}: {reply.get('error', reply)}", file=sys.stderr)
            return 1
        for path in save(reply["output"], Path(args.out), reply["id"]):
            print(f"saved {path}")
        return 0
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)


if __name__ == "__main__":
    sys.exit(main())
