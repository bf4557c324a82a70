"""SwiGLU on the fused gate/up projection, in Triton.

    gate_up[T, 2I] = [gate | up]:   h = silu(gate) · up,   silu(g) = g · σ(g)
backward:
    d_gate = dh · up · σ(g) · (1 + g · (1 − σ(g))),   d_up = dh · silu(g)
All arithmetic in fp32; h and d_gate_up are rounded once to the activation dtype.

Supported range: any T, I; the last axis must be contiguous (rows may be strided). 2-D grid over
(rows, column blocks) so a row of any width is split across programs.
Known gaps: no in-place variant writing d_gate_up over gate_up (the engine may still need gate_up).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import swiglu_backward as swiglu_backward_ref  # noqa: F401  (tests and benchmarks use it)
from .reference import swiglu_forward as swiglu_forward_ref  # noqa: F401


@triton.jit
def _swiglu_fwd_kernel(
    # pointers
    gate_up_ptr, h_ptr,
    # shapes
    T, I,
    # strides
    stride_gu_row, stride_h_row,
    # meta
    ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < T)[:, None] & (cols < I)[None, :]
    gu = gate_up_ptr + rows.to(tl.int64)[:, None] * stride_gu_row + cols[None, :]
    g = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu + I, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_h_row + cols[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    # pointers
    dh_ptr, gate_up_ptr, d_gate_up_ptr,
    # shapes
    T, I,
    # strides
    stride_dh_row, stride_gu_row, stride_dgu_row,
    # meta
    ROWS: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < T)[:, None] & (cols < I)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gu = gate_up_ptr + rows64 * stride_gu_row + cols[None, :]
    g = tl.load(gu, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu + I, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + rows64 * stride_dh_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))
    d_up = dh * g * sig
    out = d_gate_up_ptr + rows64 * stride_dgu_row + cols[None, :]
    act = d_gate_up_ptr.dtype.element_ty
    tl.store(out, d_gate.to(act), mask=mask)
    tl.store(out + I, d_up.to(act), mask=mask)


def _check_gate_up(gate_up: torch.Tensor) -> int:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.numel() == 0:
        raise ValueError(f"swiglu: gate_up must be [T, 2I] with an even, non-empty last dim, "
                         f"got {tuple(gate_up.shape)}")
    if gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"swiglu: dtype {gate_up.dtype} unsupported (float32, bfloat16 or float16)")
    if gate_up.stride(1) != 1:
        raise ValueError("swiglu: gate_up's last axis must be contiguous (call .contiguous())")
    return gate_up.shape[1] // 2


def _key(I: int, dtype: torch.dtype) -> str:
    return f"I{I}_{str(dtype).removeprefix('torch.')}"


def _config(kernel: str, I: int, dtype: torch.dtype) -> dict:
    default = ({"ROWS": 16, "BLOCK_I": 64, "num_warps": 1} if tuning.interpreting()
               else {"ROWS": 4, "BLOCK_I": 1024, "num_warps": 8})
    return tuning.best_config(kernel, _key(I, dtype), default)


def _grid(T: int, I: int, cfg: dict):
    return (triton.cdiv(T, cfg["ROWS"]), triton.cdiv(I, cfg["BLOCK_I"]))


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up[T, 2I] -> h[T, I] (same dtype)."""
    I = _check_gate_up(gate_up)
    return _forward(gate_up, _config("swiglu_fwd", I, gate_up.dtype))


def _forward(gate_up, cfg):
    T, I = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty((T, I), dtype=gate_up.dtype, device=gate_up.device)
    _swiglu_fwd_kernel[_grid(T, I, cfg)](
        gate_up, h, T, I, gate_up.stride(0), h.stride(0),
        ROWS=cfg["ROWS"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"],
    )
    return h


def swiglu_backward(dh: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """dh[T, I] -> d_gate_up[T, 2I] (gate_up.dtype)."""
    I = _check_gate_up(gate_up)
    T = gate_up.shape[0]
    if dh.shape != (T, I):
        raise ValueError(f"swiglu_backward: dh shape {tuple(dh.shape)} != (T, I) = {(T, I)}")
    if dh.stride(1) != 1:
        dh = dh.contiguous()
    return _backward(dh, gate_up, _config("swiglu_bwd", I, gate_up.dtype))


def _backward(dh, gate_up, cfg):
    T, I = dh.shape
    d_gate_up = torch.empty((T, 2 * I), dtype=gate_up.dtype, device=gate_up.device)
    _swiglu_bwd_kernel[_grid(T, I, cfg)](
        dh, gate_up, d_gate_up, T, I, dh.stride(0), gate_up.stride(0), d_gate_up.stride(0),
        ROWS=cfg["ROWS"], BLOCK_I=cfg["BLOCK_I"], num_warps=cfg["num_warps"],
    )
    return d_gate_up


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test).
# GB/s counts forward 3·T·I and backward 5·T·I elements moved.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [dict(T=8192, I=11008), dict(T=8192, I=14336), dict(T=8192, I=18944)]
CANDIDATES = [{"ROWS": r, "BLOCK_I": b, "num_warps": w}
              for r in (1, 2, 4, 8) for b in (256, 512, 1024, 2048) for w in (4, 8) if r * b <= 8192]


def autotune(shape: dict | None = None) -> list[dict]:
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    out = []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        T, I = s["T"], s["I"]
        gate_up = torch.randn(T, 2 * I, device=dev, dtype=dtype)
        dh = torch.randn(T, I, device=dev, dtype=dtype)
        h_ref, d_ref = swiglu_forward_ref(gate_up), swiglu_backward_ref(dh, gate_up)
        for kernel, run, ref, n_elems in (("swiglu_fwd", lambda c: _forward(gate_up, c), h_ref, 3 * T * I),
                                          ("swiglu_bwd", lambda c: _backward(dh, gate_up, c), d_ref, 5 * T * I)):
            cfg, ms = sweep.fastest(kernel, CANDIDATES, run, lambda c: sweep.max_rel_error(run(c), ref))
            tuning.store_config(kernel, _key(I, dtype), cfg)
            out.append(dict(shape=dict(kernel=kernel, T=T, I=I, dtype="bf16"), config=cfg, ms=ms,
                            throughput=f"{n_elems * 2 / ms / 1e6:.0f} GB/s"))
    return out
