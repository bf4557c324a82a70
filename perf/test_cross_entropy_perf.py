"""Fused linear cross-entropy: the Triton launcher vs torch (logits = h @ Wᵀ, F.cross_entropy, backward) and vs
the three plain matmuls it contains, on a Llama-3-8B head (T = 8192, H = 4096, V = 128256, bf16).

Throughput is TFLOPS over the 6·T·H·V flops of the three GEMMs (logits, dh, dW); the fused kernel's target is
≤ 1.2× the plain matmuls' time (recorded as ``ratio_to_matmuls``). Peak memory is the allocator's high-water
mark above what the inputs already hold. Without a GPU the CPU path (the torch reference) runs on a modest
shape and says so.

    pytest perf/test_cross_entropy_perf.py --benchmark-only
"""
import torch
from bench import autograd_cross_entropy, cross_entropy_inputs, plain_matmuls

from horizon_triton.kernels import cross_entropy as ce
from horizon_triton.kernels import tuning
from horizon_triton.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

GPU_SHAPE = dict(T=8192, H=4096, V=128256, chunk=4096)
CPU_SHAPE = dict(T=512, H=256, V=8192, chunk=128)


def _shape(device):
    return GPU_SHAPE if device.type == "cuda" else CPU_SHAPE


def _inputs(device, T, H, V, chunk):
    return cross_entropy_inputs(device, T, H, V, torch.bfloat16 if device.type == "cuda" else torch.float32)


def _measure(measure, fn, T, H, V, dtype, **figures) -> float:
    """The shared ``measure`` fixture over 5 rounds of the benchmark's own clock (one call is tens of ms on a GPU),
    TFLOPS over 6·T·H·V flops and the peak memory above the inputs."""
    return measure(fn, 6 * T * H * V, "6*T*H*V", rounds=5, events=False, peak_memory=True, T=T, H=H, V=V,
                   dtype=str(dtype), **figures)


def _matmuls_ms(h, weight):
    """Median ms of the three plain bf16 cuBLAS matmuls over the whole T (no softmax, no accumulation)."""
    logits = h @ weight.t()
    return tuning.time_ms(lambda: plain_matmuls(h, weight, logits), warmup=2, rep=10)


def test_fused_linear_cross_entropy(measure, record, device):
    T, H, V, chunk = _shape(device).values()
    h, weight, targets, d_weight = _inputs(device, T, H, V, chunk)
    if device.type == "cuda":
        # the config the launcher will pick, checked against the reference on this GPU before it is timed
        config = tuning.best_config(ce.KERNEL, ce.shape_key(h.dtype, H, V, chunk), ce.default_config(h.dtype))
        ratio = ce.check_error(config, H, V, device)
        record(config=config, error_over_allowed=round(ratio, 3))
        assert ratio <= 1, f"fused kernel wrong on this GPU with {config}: error {ratio:.3g}× the allowed"
        fn = lambda: linear_cross_entropy(h, weight, targets, d_weight, 1.0 / T, chunk)  # noqa: E731
        path = "triton"
    else:
        fn = lambda: linear_cross_entropy_ref(h, weight, targets, d_weight, 1.0 / T, chunk)  # noqa: E731
        path = "torch reference (CPU path)"
    ms = _measure(measure, fn, T, H, V, dtype=h.dtype, chunk=chunk, path=path)
    if device.type == "cuda":
        matmul_ms = _matmuls_ms(h, weight)
        record(matmuls_ms=round(matmul_ms, 3), ratio_to_matmuls=round(ms / matmul_ms, 3))


def test_torch_linear_cross_entropy(measure, device):
    """What a plain training loop does: full logits, fp32 cross-entropy, autograd; dW added to an fp32 buffer."""
    T, H, V, chunk = _shape(device).values()
    h, weight, targets, d_weight = _inputs(device, T, H, V, chunk)
    h.requires_grad_()
    weight.requires_grad_()
    _measure(measure, lambda: autograd_cross_entropy(h, weight, targets, d_weight), T, H, V, dtype=h.dtype,
             path="torch autograd")


def test_plain_matmuls(measure, device):
    """The floor: logits = h Wᵀ, dh = logits W, dW = logitsᵀ h, nothing else."""
    T, H, V, chunk = _shape(device).values()
    h, weight, _, _ = _inputs(device, T, H, V, chunk)
    logits = h @ weight.t()
    _measure(measure, lambda: plain_matmuls(h, weight, logits), T, H, V, dtype=h.dtype, path="torch.mm x3")
