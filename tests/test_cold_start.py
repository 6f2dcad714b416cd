"""The cold start's imports: the Runpod SDK's CPU probe is answered from /proc/cpuinfo.

Importing runpod runs `cpuinfo.get_cpu_info()` (rp_debugger), which starts a Python subprocess
and, on import, `file` and `uname`: ~1.1 s of every cold start. handler.py imports the SDK
under `without_cpu_probe()`; an audit hook in a fresh process sees every process it starts.
"""

from __future__ import annotations

import json
import subprocess
import sys

from src.runtime.cpu_probe import cpu_brand, without_cpu_probe
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


def test_the_stand_in_is_gone_afterwards():
    before = sys.modules.get("cpuinfo")
    with without_cpu_probe():
        import cpuinfo

        assert cpuinfo.get_cpu_info() == {"brand_raw": cpu_brand()}
    assert sys.modules.get("cpuinfo") is before


PROBE = """
import json, sys
started = []
sys.addaudithook(lambda event, args: started.append(str(args[0])) if event == "subprocess.Popen" else None)
import handler
import runpod.serverless.utils.rp_debugger as debugger
from src.runtime.cpu_probe import cpu_brand
stand_in = "cpuinfo" in sys.modules
at_import = list(started)
import cpuinfo
print(json.dumps({"started": at_import, "processor": debugger.PROCESSOR, "brand": cpu_brand(),
                  "stand_in_left": stand_in, "real_after": hasattr(cpuinfo, "CPUINFO_VERSION")}))
"""


def test_importing_the_handler_starts_no_process_and_the_sdk_still_knows_the_cpu():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["started"] == []
    assert facts["processor"] == facts["brand"] != ""
    assert not facts["stand_in_left"] and facts["real_after"]
