"""Fused RMSNorm + matmul: the Triton launcher vs torch (rmsnorm then matmul) and vs cuBLAS on an input that is
already normalized (the floor: the fused kernel's target is to match it, recorded as ``ratio_to_cublas``).

Shapes are Llama-3-8B's qkv (N = 6144) and gate_up (N = 28672) projections at T = 8192, bf16.
Forward TFLOPS = 2·T·N·H / time; backward (dx GEMM + dW GEMM + the norm's row pass) TFLOPS = 4·T·N·H / time.
Without a GPU the CPU path (the torch reference) runs on a small fp32 shape and says so.

    pytest perf/test_rmsnorm_matmul_perf.py --benchmark-only
"""
import pytest
import torch
from bench import rmsnorm_matmul_inputs, two_gemms_backward

from horizon_triton.kernels import tuning
from horizon_triton.kernels.reference import rmsnorm_forward

GPU_SHAPES = {"qkv": dict(T=8192, H=4096, N=6144), "gate_up": dict(T=8192, H=4096, N=28672)}
CPU_SHAPES = {"qkv": dict(T=256, H=256, N=384), "gate_up": dict(T=256, H=256, N=1024)}
EPS = 1e-5


def _kernels(device):
    """The Triton launchers on a GPU, the torch reference (the engine's CPU path) otherwise."""
    if device.type == "cuda":
        from horizon_triton.kernels import rmsnorm_matmul as m
        return m.rmsnorm_matmul_forward, m.rmsnorm_matmul_backward, "triton"
    from horizon_triton.kernels import reference as r
    return r.rmsnorm_matmul_forward, r.rmsnorm_matmul_backward, "torch reference (CPU path)"


def _inputs(device, **shape):
    return rmsnorm_matmul_inputs(device, **shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_fused_forward(measure, record, device, proj):
    shape = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[proj]
    x, g, w, _ = _inputs(device, **shape)
    forward, _, path = _kernels(device)
    ms = measure(lambda: forward(x, g, w, EPS), 2 * x.numel() * w.shape[0],
                 "2*T*N*H", path=path, dtype=str(x.dtype), **shape)
    if device.type == "cuda":
        xn, _ = rmsnorm_forward(x, g, EPS)
        cublas_ms = tuning.time_ms(lambda: xn @ w.t())
        record(cublas_prenormalized_ms=round(cublas_ms, 4), ratio_to_cublas=round(ms / cublas_ms, 3))


@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_torch_rmsnorm_then_matmul(measure, device, proj):
    """What the engine's torch path does: the normalized x is written, then read by cuBLAS."""
    shape = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[proj]
    x, g, w, _ = _inputs(device, **shape)
    measure(lambda: rmsnorm_forward(x, g, EPS)[0] @ w.t(), 2 * x.numel() * w.shape[0],
            "2*T*N*H", path="torch rmsnorm + matmul", dtype=str(x.dtype), **shape)


@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_cublas_matmul_prenormalized(measure, device, proj):
    """The floor: one matmul on an input normalized beforehand (untimed)."""
    shape = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[proj]
    x, g, w, _ = _inputs(device, **shape)
    xn, _ = rmsnorm_forward(x, g, EPS)
    measure(lambda: xn @ w.t(), 2 * x.numel() * w.shape[0], "2*T*N*H",
            path="torch.mm (cuBLAS on GPU)", dtype=str(x.dtype), **shape)


@pytest.mark.parametrize("proj", ["qkv", "gate_up"])
def test_fused_backward(measure, record, device, proj):
    shape = (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[proj]
    x, g, w, dy = _inputs(device, **shape)
    forward, backward, path = _kernels(device)
    _, rstd = forward(x, g, w, EPS)
    d_w = torch.zeros(w.shape, device=device, dtype=torch.float32)
    d_g = torch.zeros(g.shape, device=device, dtype=torch.float32)
    ms = measure(lambda: backward(dy, x, g, w, rstd, d_w, d_g),
                 4 * x.numel() * w.shape[0], "4*T*N*H", path=path, dtype=str(x.dtype), **shape)
    if device.type == "cuda":
        xn, _ = rmsnorm_forward(x, g, EPS)
        cublas_ms = tuning.time_ms(lambda: two_gemms_backward(dy, w, xn, d_w))
        record(cublas_two_gemms_ms=round(cublas_ms, 4), ratio_to_cublas=round(ms / cublas_ms, 3))
