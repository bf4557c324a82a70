"""Memory-bound kernels (SwiGLU, RoPE, RMSNorm), forward and backward: the Triton launchers vs torch eager (the
reference implementations in kernels/reference.py, which are what the engine's torch path runs).

Throughput is GB/s over the bytes each op must move at least (stated per case in ``bytes_formula``).
GPU shapes are Llama-3-8B's at T = 8192 tokens, bf16; without a GPU the CPU path (torch) runs on small fp32
shapes and says so.

    pytest perf/test_elementwise_perf.py --benchmark-only
"""
import pytest
import torch

from horizon_triton.kernels import reference


def _case(name, device):
    """-> (triton fn or None, torch fn, bytes moved, bytes formula, shape) for one op on this device."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    es = torch.finfo(dtype).bits // 8
    randn = lambda *s, dt=dtype: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    if name.startswith("swiglu"):
        T, I = (8192, 14336) if gpu else (256, 1024)
        gate_up, dh = randn(T, 2 * I), randn(T, I)
        if name == "swiglu_fwd":
            args, n_bytes, formula = (gate_up,), 3 * T * I * es, "3*T*I*elem"
        else:
            args, n_bytes, formula = (dh, gate_up), 5 * T * I * es, "5*T*I*elem"
        shape = dict(T=T, I=I)
    elif name.startswith("rope"):
        T, nH, D = (8192, 32, 128) if gpu else (256, 8, 64)
        x, cos, sin = randn(T, nH, D), randn(T, D, dt=torch.float32), randn(T, D, dt=torch.float32)
        args, n_bytes, formula = (x, cos, sin), 2 * T * nH * D * es + 2 * T * D * 4, "2*T*nH*D*elem + 2*T*D*4"
        shape = dict(T=T, nH=nH, D=D)
    else:
        T, H = (8192, 4096) if gpu else (256, 1024)
        x, w, dy = randn(T, H), randn(H), randn(T, H)
        if name == "rmsnorm_fwd":
            args, n_bytes, formula = (x, w, 1e-5), 2 * T * H * es, "2*T*H*elem"
        else:
            rstd = reference.rmsnorm_forward(x, w, 1e-5)[1]
            d_w = torch.zeros(H, device=device, dtype=torch.float32)
            args, n_bytes, formula = (dy, x, w, rstd, d_w), 3 * T * H * es, "3*T*H*elem"
        shape = dict(T=T, H=H)
    fn_name = {"swiglu_fwd": "swiglu_forward", "swiglu_bwd": "swiglu_backward", "rope_fwd": "rope_forward_",
               "rope_bwd": "rope_backward_", "rmsnorm_fwd": "rmsnorm_forward",
               "rmsnorm_bwd": "rmsnorm_backward"}[name]
    torch_fn = getattr(reference, fn_name)
    triton_fn = None
    if gpu:
        import importlib
        module = importlib.import_module(f"horizon_triton.kernels.{name.rsplit('_', 1)[0]}")
        triton_fn = getattr(module, fn_name)
    return triton_fn, torch_fn, args, n_bytes, formula, shape


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("op", ["swiglu_fwd", "swiglu_bwd", "rope_fwd", "rope_bwd", "rmsnorm_fwd", "rmsnorm_bwd"])
def test_elementwise(measure, record, device, op, impl):
    triton_fn, torch_fn, args, n_bytes, formula, shape = _case(op, device)
    if impl == "triton" and triton_fn is not None:
        fn, path = (lambda: triton_fn(*args)), "triton"
    else:
        fn = lambda: torch_fn(*args)  # noqa: E731
        path = "torch eager" if device.type == "cuda" else "torch (CPU path: no GPU, Triton not run)"
    ms = measure(fn, path=path, dtype=str(args[0].dtype), **shape)
    record(gbps=round(n_bytes / ms / 1e6, 1), bytes_formula=formula)
