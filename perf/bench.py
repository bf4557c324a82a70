"""What the benchmarks (perf/test_*_perf.py) and the GPU check (perf/gpu_check.py) share: the inputs of each kernel
family at a given shape, the library baselines they are measured against, and the FLOP formulas of a step.

Every function takes the device and shape it is asked for; the callers choose GPU or CPU shapes.
"""
from __future__ import annotations

import os
import subprocess

import torch
import torch.nn.functional as F

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "GH200": 989.0}   # dense bf16, per datasheet

# The CPU AdamW step: bf16 grads in, fp32 master and moments updated, bf16 weights out. It must move 28 bytes per
# parameter (read master 4, grad 2, exp_avg 4, exp_avg_sq 4; write master, exp_avg, exp_avg_sq, bf16 weights).
ADAMW_BYTES_PER_PARAM = 28
ADAMW_HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
ADAMW_GRAD_SCALE = 0.25        # clipping coefficient folded into the gradient


def commit() -> str:
    """Short commit of the checkout, with '+dirty' when tracked files differ from it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def cuda_peak_extra_bytes(fn) -> int:
    """The allocator's high-water mark above what was allocated before one call of fn (CUDA)."""
    torch.cuda.synchronize()  # sync: the window must start after earlier work freed its memory
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()  # sync: the peak is read after fn's work ran
    return torch.cuda.max_memory_allocated() - base


# ---- attention ------------------------------------------------------------------------------------------------
def attention_inputs(device, B, S, Hq, Hkv, D, dtype):
    """q, k, v, do: [B, S, H, D] (the kernels' layout), seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    return tuple(torch.randn(B, S, h, D, device=device, dtype=dtype, generator=gen) for h in (Hq, Hkv, Hkv, Hq))


def sdpa_inputs(q, k, v):
    """[B, S, H, D] → [B, H, S, D] views, k/v repeated onto the query heads (untimed; same FLOPs): SDPA's flash
    backend is MHA-only."""
    group = q.shape[2] // k.shape[2]
    return tuple(t.repeat_interleave(r, dim=2).transpose(1, 2) for t, r in ((q, 1), (k, group), (v, group)))


def sdpa_forward_backward(q, k, v, do, scale):
    """SDPA (is_causal) forward and its autograd backward on the kernels' [B, S, H, D] inputs."""
    qs, ks, vs = (t.detach().requires_grad_() for t in sdpa_inputs(q, k, v))
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
    return torch.autograd.grad(o, (qs, ks, vs), do.transpose(1, 2))


# ---- rmsnorm + matmul -----------------------------------------------------------------------------------------
def rmsnorm_matmul_inputs(device, T, H, N, dtype):
    """x [T, H], norm weight g [H], weight w [N, H], upstream gradient dy [T, N], seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    g = (1 + 0.1 * torch.randn(H, device=device, generator=gen)).to(dtype)
    w = torch.randn(N, H, device=device, dtype=dtype, generator=gen) / H ** 0.5
    dy = torch.randn(T, N, device=device, dtype=dtype, generator=gen)
    return x, g, w, dy


def two_gemms_backward(dy, w, xn, d_w):
    """The floor of rmsnorm_matmul's backward: dx = dy W and dW += dyᵀ x̂ (bf16 GEMM, added to fp32) on an input
    normalized beforehand."""
    dy @ w
    d_w.add_(dy.t() @ xn)


# ---- cross-entropy --------------------------------------------------------------------------------------------
def cross_entropy_inputs(device, T, H, V, dtype):
    """h [T, H], weight [V, H], targets [T] (every 7th ignored), d_weight fp32 [V, H] zeroed, seeded."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    targets[::7] = -100
    d_weight = torch.zeros(V, H, device=device, dtype=torch.float32)
    return h, weight, targets, d_weight


def plain_matmuls(h, weight, logits):
    """The floor of the fused cross-entropy: logits = h Wᵀ (into ``logits``), dh = logits W, dW = logitsᵀ h."""
    torch.mm(h, weight.t(), out=logits)
    logits @ weight
    logits.t() @ h


def autograd_cross_entropy(h, weight, targets, d_weight):
    """What a plain training loop does: full logits, fp32 cross-entropy, autograd; dW added to an fp32 buffer.
    h and weight must require grad."""
    logits = h @ weight.t()                                             # [T, V]
    loss = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    (loss / h.shape[0]).backward()
    d_weight.add_(weight.grad)
    h.grad = weight.grad = None


# ---- a whole engine step --------------------------------------------------------------------------------------
STEP_FLOP_FORMULAS = {
    "6pt": "6·P·T, P = parameters without the embedding table (the lm_head matmul counts)",
    "model": "6·P·T + 3·(4·B·S²·Hq·D / 2)·L: the attention matmuls forward and backward, causal half",
}


def engine_flops(cfg, batch: int, seq: int, accum: int):
    """(6PT flops, model flops, tokens) of one optimizer step; recompute is not counted in either (useful work)."""
    params = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    params += cfg.vocab_size * cfg.hidden_size     # the lm_head matmul is compute, the embedding lookup is not
    tokens = batch * seq * accum
    six_pt = 6 * params * tokens
    attention = 3 * 2 * 2 * batch * accum * seq * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers / 2
    return six_pt, six_pt + attention, tokens


def copy_gbps(host: torch.Tensor, device: torch.device, repeats: int = 10) -> float:
    """GB/s of a plain copy of ``host`` onto ``device`` (asynchronous from pinned memory on CUDA), best effort
    timing: CUDA events around ``repeats`` copies, or the wall clock on CPU."""
    dst = torch.empty_like(host, device=device)
    dst.copy_(host)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dst.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()  # sync: read the timing
        seconds = start.elapsed_time(end) / 1e3
    else:
        import time
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(host)
        seconds = time.perf_counter() - t0
    return repeats * host.numel() * host.element_size() / seconds / 1e9
