"""gpt-oss's clamped SwiGLU on its interleaved gate/up projection, in Triton.

    gate_up[M, 2I] interleaved: gate = gate_up[:, 0::2], up = gate_up[:, 1::2]
    g = min(gate, limit),  u = clamp(up, −limit, limit),  h = (u + 1) · g · σ(α g)
backward (torch's clamp passes the gradient where min ≤ x ≤ max):
    d_gate = dh · (u + 1) · σ(αg) · (1 + α g (1 − σ(αg)))   where gate ≤ limit, else 0
    d_up   = dh · g · σ(αg)                                 where −limit ≤ up ≤ limit, else 0
All arithmetic in fp32; h and d_gate_up are rounded once to the activation dtype. gpt-oss: α = 1.702, limit = 7.
The expert biases are added by the grouped GEMM before this (kernels/moe_experts.py).

Supported range: any M, I; the last axis must be contiguous (rows may be strided). 2-D grid over
(rows, column blocks), as kernels/swiglu.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import clamped_swiglu_backward as clamped_swiglu_backward_ref  # noqa: F401  (tests, benchmarks)
from .reference import clamped_swiglu_forward as clamped_swiglu_forward_ref  # noqa: F401


@triton.jit
def _clamped_swiglu_fwd_kernel(
    # pointers
    gate_up_ptr, h_ptr,
    # shapes
    M, I,
    # strides
    stride_gu_row, stride_h_row,
    # meta
    alpha, limit, ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    gu = gate_up_ptr + rows.to(tl.int64)[:, None] * stride_gu_row + 2 * cols[None, :]
    g = tl.minimum(tl.load(gu, mask=mask, other=0.0).to(tl.float32), limit)
    u = tl.minimum(tl.maximum(tl.load(gu + 1, mask=mask, other=0.0).to(tl.float32), -limit), limit)
    h = (u + 1.0) * g * tl.sigmoid(alpha * g)
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_h_row + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _clamped_swiglu_bwd_kernel(
    # pointers
    dh_ptr, gate_up_ptr, d_gate_up_ptr,
    # shapes
    M, I,
    # strides
    stride_dh_row, stride_gu_row, stride_dgu_row,
    # meta
    alpha, limit, ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gu = gate_up_ptr + rows64 * stride_gu_row + 2 * cols[None, :]
    gate = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu + 1, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + rows64 * stride_dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.minimum(gate, limit)
    u = tl.minimum(tl.maximum(up, -limit), limit)
    sig = tl.sigmoid(alpha * g)
    d_gate = tl.where(gate <= limit, dh * (u + 1.0) * sig * (1.0 + alpha * g * (1.0 - sig)), 0.0)
    d_up = tl.where((up >= -limit) & (up <= limit), dh * g * sig, 0.0)
    out = d_gate_up_ptr + rows64 * stride_dgu_row + 2 * cols[None, :]
    act = d_gate_up_ptr.dtype.element_ty
    tl.store(out, d_gate.to(act), mask=mask)
    tl.store(out + 1, d_up.to(act), mask=mask)


def _check_gate_up(gate_up: torch.Tensor, name: str) -> int:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.numel() == 0:
        raise ValueError(f"{name}: gate_up must be [M, 2I] with an even, non-empty last dim, "
                         f"got {tuple(gate_up.shape)}")
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: dtype {gate_up.dtype} unsupported (float32, bfloat16 or float16)")
    if gate_up.stride(1) != 1:
        raise ValueError(f"{name}: gate_up's last axis must be contiguous (call .contiguous())")
    return gate_up.shape[1] // 2


def _config(kernel: str, I: int, dtype: torch.dtype) -> dict:
    default = ({"ROWS": 16, "BLOCK_I": 64, "num_warps": 1} if tuning.interpreting()
               else {"ROWS": 4, "BLOCK_I": 512, "num_warps": 8})
    return tuning.best_config(kernel, f"I{I}_{str(dtype).removeprefix('torch.')}", default)


def _grid(M: int, I: int, cfg: dict):
    return (triton.cdiv(M, cfg["ROWS"]), triton.cdiv(I, cfg["BLOCK_I"]))


def clamped_swiglu_forward(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gate_up[M, 2I] interleaved -> h[M, I] (same dtype)."""
    I = _check_gate_up(gate_up, "clamped_swiglu_forward")
    return _forward(gate_up, alpha, limit, _config("clamped_swiglu_fwd", I, gate_up.dtype))


def _forward(gate_up, alpha, limit, cfg):
    M, I = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty((M, I), dtype=gate_up.dtype, device=gate_up.device)
    _clamped_swiglu_fwd_kernel[_grid(M, I, cfg)](
        gate_up, h, M, I, gate_up.stride(0), h.stride(0), float(alpha), float(limit),
        ROWS=cfg["ROWS"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"])
    return h


def clamped_swiglu_backward(dh: torch.Tensor, gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """dh[M, I] -> d_gate_up[M, 2I] interleaved (gate_up.dtype)."""
    I = _check_gate_up(gate_up, "clamped_swiglu_backward")
    if dh.shape != (gate_up.shape[0], I):
        raise ValueError(f"clamped_swiglu_backward: dh shape {tuple(dh.shape)} != (M, I) = {(gate_up.shape[0], I)}")
    if dh.stride(1) != 1:
        dh = dh.contiguous()
    return _backward(dh, gate_up, alpha, limit, _config("clamped_swiglu_bwd", I, gate_up.dtype))


def _backward(dh, gate_up, alpha, limit, cfg):
    M, I = dh.shape
    d_gate_up = torch.empty((M, 2 * I), dtype=gate_up.dtype, device=gate_up.device)
    _clamped_swiglu_bwd_kernel[_grid(M, I, cfg)](
        dh, gate_up, d_gate_up, M, I, dh.stride(0), gate_up.stride(0), d_gate_up.stride(0), float(alpha),
        float(limit), ROWS=cfg["ROWS"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"])
    return d_gate_up


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test).
# GB/s counts forward 3·M·I and backward 5·M·I elements moved. gpt-oss-120b: I = 2880, M = T·k.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [dict(M=65536, I=2880)]
CANDIDATES = [{"ROWS": r, "BLOCK_I": b, "num_warps": w}
              for r in (1, 2, 4, 8) for b in (256, 512, 1024) for w in (4, 8) if r * b <= 8192]
ALPHA, LIMIT = 1.702, 7.0


def autotune(shape: dict | None = None) -> list[dict]:
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    out = []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        M, I = s["M"], s["I"]
        gate_up = torch.randn(M, 2 * I, device=dev, dtype=dtype) * 4
        dh = torch.randn(M, I, device=dev, dtype=dtype)
        h_ref = clamped_swiglu_forward_ref(gate_up, ALPHA, LIMIT)
        d_ref = clamped_swiglu_backward_ref(dh, gate_up, ALPHA, LIMIT)
        for kernel, run, ref, n_elems in (
                ("clamped_swiglu_fwd", lambda c: _forward(gate_up, ALPHA, LIMIT, c), h_ref, 3 * M * I),
                ("clamped_swiglu_bwd", lambda c: _backward(dh, gate_up, ALPHA, LIMIT, c), d_ref, 5 * M * I)):
            cfg, ms = sweep.fastest(kernel, CANDIDATES, run, lambda c: sweep.max_rel_error(run(c), ref))
            tuning.store_config(kernel, f"I{I}_bfloat16", cfg)
            out.append(dict(shape=dict(kernel=kernel, M=M, I=I, dtype="bf16"), config=cfg, ms=ms,
                            throughput=f"{n_elems * 2 / ms / 1e6:.0f} GB/s"))
    return out
