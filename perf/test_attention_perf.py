"""Flash attention: the Triton launchers vs torch SDPA (is_causal; FlashAttention-2 inside PyTorch on a GPU).

Shapes: 16K tokens per batch (B = 16384 / S) at S in {1K, 4K}, Hq = 32, Hkv = 8, D = 128, bf16, causal, no
documents. The kernels run grouped-query attention directly; SDPA gets k/v repeated to 32 heads beforehand
(untimed; same FLOPs), since its flash backend is MHA-only.
TFLOPS: forward 2·B·Hq·S²·D (causal halves the 4·B·Hq·S²·D of QKᵀ and PV); forward + backward 3.5× that
(the backward's five matmuls are 2.5× the forward's two). Targets on H100: forward ≥ 450, backward ≥ 300.
Without a GPU the CPU path (the torch reference, and SDPA on CPU) runs on a small fp32 shape and says so.

    pytest perf/test_attention_perf.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F
from bench import attention_inputs, sdpa_forward_backward, sdpa_inputs

from horizon_triton.kernels import tuning
from horizon_triton.kernels.attention import attention_flops

GPU_SHAPES = {"S1K": dict(B=16, S=1024, Hq=32, Hkv=8, D=128), "S4K": dict(B=4, S=4096, Hq=32, Hkv=8, D=128)}
CPU_SHAPES = {"S1K": dict(B=1, S=128, Hq=4, Hkv=2, D=64), "S4K": dict(B=1, S=256, Hq=4, Hkv=2, D=64)}


def _kernels(device):
    """The Triton launchers on a GPU, the torch reference (the engine's CPU path) otherwise."""
    if device.type == "cuda":
        from horizon_triton.kernels import attention as a
        return a.attention_forward, a.attention_backward, "triton"
    from horizon_triton.kernels import reference as r
    return r.attention_forward, r.attention_backward, "torch reference (CPU path)"


def _shape(device, name):
    return (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[name]


def _inputs(device, **shape):
    return attention_inputs(device, **shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_forward(measure, record, device, name):
    shape = _shape(device, name)
    q, k, v, _ = _inputs(device, **shape)
    forward, _, path = _kernels(device)
    scale = shape["D"] ** -0.5
    ms = measure(lambda: forward(q, k, v, None, scale),
                 attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"]), "2*B*Hq*S^2*D",
                 path=path, dtype=str(q.dtype), **shape)
    if device.type == "cuda":
        qs, ks, vs = sdpa_inputs(q, k, v)
        sdpa_ms = tuning.time_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
        record(sdpa_ms=round(sdpa_ms, 4), ratio_to_sdpa=round(ms / sdpa_ms, 3))


@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_forward_backward(measure, record, device, name):
    shape = _shape(device, name)
    q, k, v, do = _inputs(device, **shape)
    forward, backward, path = _kernels(device)
    scale = shape["D"] ** -0.5

    def step():
        o, lse = forward(q, k, v, None, scale)
        return backward(do, q, k, v, o, lse, None, scale)

    ms = measure(step,
                 3.5 * attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"]), "3.5*2*B*Hq*S^2*D",
                 path=path, dtype=str(q.dtype), **shape)
    if device.type == "cuda":
        o, lse = forward(q, k, v, None, scale)
        bwd_ms = tuning.time_ms(lambda: backward(do, q, k, v, o, lse, None, scale))
        bwd_flops = attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"], backward=True)
        record(backward_ms=round(bwd_ms, 4), backward_tflops=float(f"{bwd_flops / bwd_ms / 1e9:.4g}"))
        sdpa_ms = tuning.time_ms(lambda: sdpa_forward_backward(q, k, v, do, scale))
        record(sdpa_ms=round(sdpa_ms, 4), ratio_to_sdpa=round(ms / sdpa_ms, 3))


@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_sdpa_forward(measure, device, name):
    """The bar: PyTorch's SDPA (flash backend on a GPU) on the same shape."""
    shape = _shape(device, name)
    q, k, v, _ = _inputs(device, **shape)
    qs, ks, vs = sdpa_inputs(q, k, v)
    scale = shape["D"] ** -0.5
    measure(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale),
            attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"]), "2*B*Hq*S^2*D",
            path="torch SDPA is_causal", dtype=str(q.dtype), **shape)


@pytest.mark.parametrize("name", list(GPU_SHAPES))
def testsdpa_forward_backward(measure, device, name):
    shape = _shape(device, name)
    q, k, v, do = _inputs(device, **shape)
    scale = shape["D"] ** -0.5
    measure(lambda: sdpa_forward_backward(q, k, v, do, scale),
            3.5 * attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"]), "3.5*2*B*Hq*S^2*D",
            path="torch SDPA is_causal + autograd", dtype=str(q.dtype), **shape)
