"""The Runpod SDK's import-time CPU probe, answered from /proc/cpuinfo instead.

`runpod.serverless.utils.rp_debugger` calls `cpuinfo.get_cpu_info()` when it is first imported,
which every `import runpod` does. That call starts a second Python process to read the CPUID and
importing py-cpuinfo itself runs `file` and `uname`: about 1.1 s of every cold start on a 2-core
CPU, for one string the SDK prints in its debug checkpoints. `without_cpu_probe()` wraps the first
`import runpod` with a stand-in `cpuinfo` module that answers that one call from /proc/cpuinfo,
then takes it away again, so a later `import cpuinfo` gets the real one. The SDK is not forked.
"""

from __future__ import annotations

import platform
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_brand(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name, as py-cpuinfo's `brand_raw` gives it on Linux."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


@contextmanager
def without_cpu_probe() -> Iterator[None]:
    """Within: `import cpuinfo` gives a stand-in whose `get_cpu_info()` holds the brand alone."""
    stand_in = types.ModuleType("cpuinfo", "py-cpuinfo's one call the Runpod SDK makes, answered cheaply")
    stand_in.get_cpu_info = lambda: {"brand_raw": cpu_brand()}
    real = sys.modules.get("cpuinfo")
    sys.modules["cpuinfo"] = stand_in
    try:
        yield
    finally:
        if real is None:
            sys.modules.pop("cpuinfo", None)
        else:
            sys.modules["cpuinfo"] = real
