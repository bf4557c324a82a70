"""Benchmark-wide setup: which device the benchmarks run on, and what every benchmark records about it.

Without a GPU the benchmarks run the CPU path (torch references, or the Triton interpreter on small shapes)
and say so in their extra_info, instead of failing."""
import pytest
import torch
from bench import commit

from horizon_triton.kernels import tuning


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def record(benchmark, device):
    """record(**figures): stores the device, commit and the given figures in the benchmark's extra_info."""
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no GPU: CPU path measured)"
    benchmark.extra_info.update(device=name, commit=commit())

    def _record(**figures):
        benchmark.extra_info.update(figures)
    return _record


@pytest.fixture
def measure(benchmark, record, device):
    """measure(fn, flops=None, flop_formula=None, rounds=10, events=True, peak_memory=False, **figures) -> ms.

    Runs fn once as a warm-up (compile, autotune and cuBLAS caches), then benchmarks it with a sync after each
    call (``rounds`` rounds on a GPU, 3 on CPU). The ms it returns and records is the median of CUDA events on a
    GPU (tuning.time_ms), or of the benchmark's own rounds on CPU or with events=False. Records ``tflops`` from
    ``flops`` as well, ``peak_extra_memory_GiB`` (the allocator's high-water mark above what was allocated
    before the timed rounds) with peak_memory on a GPU, and any other ``figures``."""
    cuda = device.type == "cuda"

    def step(fn):
        fn()
        if cuda:
            torch.cuda.synchronize()  # sync: the benchmark's wall clock must cover the GPU work

    def _measure(fn, flops=None, flop_formula=None, rounds=10, events=True, peak_memory=False, **figures):
        step(fn)                                                      # warm-up
        if peak_memory and cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        benchmark.pedantic(step, args=(fn,), rounds=rounds if cuda else 3, iterations=1, warmup_rounds=1)
        if peak_memory and cuda:
            figures["peak_extra_memory_GiB"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 30, 3)
        ms = tuning.time_ms(fn) if cuda and events else benchmark.stats.stats.median * 1e3
        if flops is not None:
            figures.update(tflops=float(f"{flops / ms / 1e9:.4g}"), flop_formula=flop_formula)
        record(ms=round(ms, 4), **figures)
        return ms
    return _measure
