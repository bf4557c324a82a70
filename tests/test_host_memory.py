"""Host memory: 16 bytes per parameter plus a fixed overhead, growing linearly with depth.

Each depth runs in a fresh process so that its peak resident memory (ru_maxrss) is its own."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("host_memory_probe.py")
GiB = 1024**3


def _probe(depth: int) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), str(depth)], capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_host_memory_is_16_bytes_per_parameter_plus_fixed_overhead():
    shallow, deep = _probe(2), _probe(12)      # about 88M and 201M parameters
    assert deep["params"] > 200e6
    for run in (shallow, deep):
        assert run["store_bytes"] == 16 * run["params"]
        assert run["rss_growth"] <= 16 * run["params"] + 1 * GiB, run
    per_added_param = (deep["rss_growth"] - shallow["rss_growth"]) / (deep["params"] - shallow["params"])
    assert 15.0 <= per_added_param <= 17.0, per_added_param
