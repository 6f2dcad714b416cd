"""`import runpod` without the two things in it that a serverless worker never uses.

Every `import runpod` pays for them on every cold start (measured with `-X importtime` on a 2-core
CPU; benchmarks/cost/imports.py):

- **The CPU probe.** `runpod.serverless.utils.rp_debugger` calls `cpuinfo.get_cpu_info()` when it
  is first imported. That starts a second Python process to read the CPUID, and importing
  py-cpuinfo itself runs `file` and `uname`: about 1.1 s, for one string the SDK prints in its
  debug checkpoints. Here a stand-in `cpuinfo` module answers that one call from /proc/cpuinfo.
- **The SSH command line.** `runpod.cli` imports its `ssh` group, and with it paramiko, invoke
  and cryptography's SSH keys: about 50 ms. Here that module is a stand-in that imports the real
  one the first time anything reads from it, so the `runpod ssh` commands still work.

`lean_sdk_import()` puts both stand-ins in `sys.modules` for the first `import runpod` and takes
them away afterwards, so a later `import cpuinfo` or `import runpod.cli.groups.ssh` gets the real
module. The SDK is not forked.
"""

from __future__ import annotations

import importlib
import platform
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
SSH_COMMANDS = "runpod.cli.groups.ssh"


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


class Deferred(types.ModuleType):
    """A module imported for real the first time one of its attributes is read."""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


@contextmanager
def lean_sdk_import() -> Iterator[None]:
    """Within: `import cpuinfo` answers from /proc/cpuinfo and the SDK's SSH commands wait for use."""
    probe = types.ModuleType("cpuinfo", "py-cpuinfo's one call the Runpod SDK makes, answered cheaply")
    probe.get_cpu_info = lambda: {"brand_raw": cpu_brand()}
    stand_ins = {"cpuinfo": probe, SSH_COMMANDS: Deferred(SSH_COMMANDS)}
    before = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is not module:
                continue  # imported for real meanwhile
            if before[name] is None:
                del sys.modules[name]
            else:
                sys.modules[name] = before[name]
