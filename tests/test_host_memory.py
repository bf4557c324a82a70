"""Host memory: 14 bytes per parameter by default (8 with 8-bit moments) plus a fixed overhead, growing linearly
with depth.

Each depth runs in a fresh process so that its peak resident memory (ru_maxrss) is its own."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("host_memory_probe.py")
GiB = 1024**3


def _probe(depth: int, *flags: str) -> dict:
    out = subprocess.run([sys.executable, str(PROBE), str(depth), *flags], capture_output=True, text=True,
                         check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("states, store_bytes_per_param, max_slope", [("fp32", 14.0, 14.1), ("8bit", 8.04, 8.2)])
def test_peak_host_memory_per_parameter(states, store_bytes_per_param, max_slope):
    shallow, deep = _probe(2, "--states", states), _probe(12, "--states", states)   # about 88M and 201M
    assert deep["params"] > 200e6
    for run in (shallow, deep):
        assert run["store_bytes"] <= store_bytes_per_param * run["params"]
        assert run["host_peak_bytes"] == run["store_bytes"]           # history reports the store's real bytes
        assert run["rss_growth"] <= store_bytes_per_param * run["params"] + 1 * GiB, run
    per_added_param = (deep["rss_growth"] - shallow["rss_growth"]) / (deep["params"] - shallow["params"])
    assert store_bytes_per_param - 1.0 <= per_added_param <= max_slope, per_added_param
