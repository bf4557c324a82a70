"""Benchmark-wide setup: which device the benchmarks run on, and what every benchmark records about it.

Without a GPU the benchmarks run the CPU path (torch references, or the Triton interpreter on small shapes)
and say so in their extra_info, instead of failing."""
import os
import subprocess

import pytest
import torch


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=5).stdout.strip()
    except OSError:
        return "unknown"


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def record(benchmark, device):
    """record(**figures): stores the device, commit and the given figures in the benchmark's extra_info."""
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no GPU: CPU path measured)"
    benchmark.extra_info.update(device=name, commit=_commit())

    def _record(**figures):
        benchmark.extra_info.update(figures)
    return _record
