"""The cold start's imports: nothing on the way to the first job that this worker does not use.

- Importing runpod runs `cpuinfo.get_cpu_info()` (rp_debugger), which starts a Python subprocess
  and, on import, `file` and `uname`: ~1.1 s. handler.py imports the SDK under
  `lean_sdk_import()`, which answers it from /proc/cpuinfo; an audit hook in a fresh process sees
  every process it starts.
- The SDK's SSH commands (paramiko, invoke) wait until something reads them; FastAPI is imported
  only when the SDK's local API is served.
- handler.py pauses the cyclic GC while it imports and freezes what it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from src.jobs import job_loop
from src.runtime.sdk_import import SSH_COMMANDS, Deferred, cpu_brand, lean_sdk_import
from tests.conftest import ROOT

SAMPLE = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9554 64-Core Processor
flags\t\t: fpu vme

processor\t: 1
model name\t: AMD EPYC 9554 64-Core Processor
"""


def test_the_brand_is_the_first_model_name_and_a_missing_file_falls_back(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(SAMPLE)
    assert cpu_brand(cpuinfo) == "AMD EPYC 9554 64-Core Processor"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # no model name (some ARM kernels)
    assert cpu_brand(cpuinfo) and cpu_brand(tmp_path / "absent") == cpu_brand(cpuinfo)


def test_the_stand_ins_are_gone_afterwards():
    before = {name: sys.modules.get(name) for name in ("cpuinfo", SSH_COMMANDS)}
    with lean_sdk_import():
        import cpuinfo

        assert cpuinfo.get_cpu_info() == {"brand_raw": cpu_brand()}
        assert isinstance(sys.modules[SSH_COMMANDS], Deferred)
    assert {name: sys.modules.get(name) for name in before} == before


def test_a_deferred_module_is_imported_on_first_read():
    deferred = Deferred("colorsys")
    sys.modules.pop("colorsys", None)
    assert deferred.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert sys.modules["colorsys"] is not deferred


PROBE = """
import gc, json, sys
started = []
sys.addaudithook(lambda event, args: started.append(str(args[0])) if event == "subprocess.Popen" else None)
import handler
import runpod.serverless.utils.rp_debugger as debugger
from src.runtime.sdk_import import cpu_brand
facts = {"started": list(started), "processor": debugger.PROCESSOR, "brand": cpu_brand(),
         "left": [name for name in ("cpuinfo", "paramiko", "invoke", "fastapi", "runpod.cli.groups.ssh",
                                    "uvicorn", "starlette", "src.lb.server")
                  if name in sys.modules],
         "gc_enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
import cpuinfo
import runpod
facts["real_cpuinfo"] = hasattr(cpuinfo, "CPUINFO_VERSION")
facts["ssh_commands"] = callable(runpod.cli.ssh.functions.get_user_pub_keys)
facts["paramiko_after"] = "paramiko" in sys.modules
print(json.dumps(facts))
"""


def test_importing_the_handler_starts_no_process_and_imports_no_ssh_or_fastapi():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["started"] == []
    assert facts["processor"] == facts["brand"] != ""
    assert facts["left"] == []  # neither stand-in stays; no SSH, FastAPI or the lb server's stack
    assert facts["gc_enabled"] and facts["frozen"] > 100_000  # paused for the imports, then frozen
    # The SDK still works where it was cut: the real cpuinfo and, when read, the SSH commands.
    assert facts["real_cpuinfo"] and facts["ssh_commands"] and facts["paramiko_after"]


@pytest.mark.parametrize(
    ("argv", "realtime_port", "serves"),
    [
        (["handler.py"], None, False),
        (["handler.py", "--test_input", "{}"], None, False),
        (["handler.py", "--rp_serve_api", "--rp_api_port", "8010"], None, True),
        (["handler.py"], "0", False),
        (["handler.py"], "8080", True),
    ],
)
def test_the_local_api_is_known_before_the_sdk_starts(monkeypatch, argv, realtime_port, serves):
    monkeypatch.setattr(sys, "argv", argv)
    if realtime_port is None:
        monkeypatch.delenv("RUNPOD_REALTIME_PORT", raising=False)
    else:
        monkeypatch.setenv("RUNPOD_REALTIME_PORT", realtime_port)
    assert job_loop.serves_local_api() is serves
    assert sys.argv == argv  # the SDK parses the flags itself, later
