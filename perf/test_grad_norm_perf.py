"""The squared gradient norm of one layer's fp32 accumulator (scheduler._sq_norm) against one fp32 reduction of
the whole layer (what it replaced, ~1e-4..1e-3 off on CPU) and a float64 cast of the whole layer (exact, twice
the layer in temporary memory). Throughput is GB/s over the 4 bytes per element read; ``rel_error`` is against
the float64 sum of squares.

GPU: a Llama-3-8B decoder layer (218 M elements); CPU: 20 M elements.

    pytest perf/test_grad_norm_perf.py --benchmark-only
"""
import pytest
import torch

from horizon_triton.schedule.scheduler import _sq_norm

CASES = {
    "sq_norm": _sq_norm,
    "fp32_whole": lambda acc: torch.linalg.vector_norm(acc).square(),
    "float64_cast": lambda acc: torch.linalg.vector_norm(acc, dtype=torch.float64).square(),
}


@pytest.mark.parametrize("impl", list(CASES))
def test_grad_norm(measure, record, device, impl):
    n = 218_103_808 if device.type == "cuda" else 20_000_000
    acc = torch.randn(n, device=device) * 1e-3
    exact = acc.double().square().sum().item()
    fn = CASES[impl]
    ms = measure(lambda: fn(acc), elements=n)
    record(gbps=round(4 * n / ms / 1e6, 1), bytes_formula="4*elements",
           rel_error=float(f"{abs(fn(acc).item() - exact) / exact:.2e}"), torch_threads=torch.get_num_threads())
