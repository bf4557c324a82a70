"""Row-wise RMSNorm in Triton, forward and backward.

    rstd = 1 / sqrt(mean(x²) + eps)                    (fp32, one per row)
    y    = round(x · rstd) · round(g)                  (round = to the activation dtype, as transformers does)
backward, with xhat = x · rstd and dxhat = dy · g:
    dx = rstd · (dxhat − xhat · mean(dxhat · xhat)),   dg += Σ_rows dy · xhat   (fp32, accumulated in place)

Works on x[..., H]: the engine uses it on [T, H] hidden states and per head on [T, nH, D] for q/k-norm.
Every leading axis is flattened into rows; the last axis must be contiguous (a strided view whose rows cannot
be flattened without a copy is copied once).

Supported range: H ≤ 32768 (one row lives in registers). Small rows (head dims) are packed ROWS to a
program so a program still moves a few KB.
Known gaps: dg is reduced through an fp32 partial buffer [programs, H] and a torch sum (deterministic, one
small extra launch) rather than atomics; no fused residual add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import rmsnorm_backward as rmsnorm_backward_ref  # noqa: F401  (tests and benchmarks use it)
from .reference import rmsnorm_forward as rmsnorm_forward_ref  # noqa: F401

MAX_H = 32768


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rmsnorm_fwd_kernel(
    # pointers
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    # shapes
    n_rows, H,
    # strides
    stride_x_row, stride_y_row,
    # meta
    eps,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program normalizes ROWS rows of BLOCK_H ≥ H columns."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)                                  # [ROWS]
    act = y_ptr.dtype.element_ty
    g = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(act).to(tl.float32)         # [BLOCK_H]
    xhat = (x * rstd[:, None]).to(act).to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_y_row + cols[None, :], (xhat * g[None, :]).to(act), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rmsnorm_rstd_kernel(
    # pointers
    x_ptr, rstd_ptr,
    # shapes
    n_rows, H,
    # strides
    stride_x_row,
    # meta
    eps,
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """rstd only (the fused RMSNorm + matmul normalizes its GEMM tiles itself)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < H)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_x_row + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    tl.store(rstd_ptr + rows, tl.rsqrt(tl.sum(x * x, axis=1) / H + eps), mask=row_ok)


@triton.jit
def _rmsnorm_bwd_kernel(
    # pointers
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dg_partial_ptr,
    # shapes
    n_rows, H,
    # strides
    stride_dy_row, stride_x_row, stride_dx_row,
    # meta
    ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program p handles row blocks p, p + P, p + 2P, ... and writes its dg partial sum to row p."""
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    g = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(pid * ROWS, n_rows, n_programs * ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]                                                      # [ROWS, BLOCK_H]
        dxhat = dy * g[None, :]
        c = tl.sum(dxhat * xhat, axis=1) / H                                          # [ROWS]
        dx = rstd[:, None] * (dxhat - xhat * c[:, None])
        tl.store(dx_ptr + rows64[:, None] * stride_dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        dg += tl.sum(dy * xhat, axis=0)
    tl.store(dg_partial_ptr + pid * H + cols, dg, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, name: str, H: int) -> torch.Tensor:
    """t[..., H] as a 2-D [rows, H] tensor with a contiguous last axis (a view when possible)."""
    if t.shape[-1] != H:
        raise ValueError(f"rmsnorm: {name} has last dim {t.shape[-1]}, expected H={H}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    t2 = t.reshape(-1, H)
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"rmsnorm: x must be a non-empty [..., H] tensor, got shape {tuple(x.shape)}")
    H = x.shape[-1]
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"rmsnorm: x dtype {x.dtype} unsupported (float32, bfloat16 or float16)")
    if weight.shape != (H,):
        raise ValueError(f"rmsnorm: weight shape {tuple(weight.shape)} does not match x's last dim H={H}")
    if weight.device != x.device:
        raise ValueError(f"rmsnorm: weight is on {weight.device}, x on {x.device}")
    if H > MAX_H:
        raise ValueError(f"rmsnorm: H={H} > {MAX_H} does not fit one row in registers; split the row")
    return H


def _default_config(H: int, elem_bytes: int) -> dict:
    """ROWS · BLOCK_H about 4K elements per program, at least one whole row."""
    block_h = triton.next_power_of_2(H)
    rows = 1 if tuning.interpreting() else max(1, min(64, 4096 // block_h))
    warps = 4 if block_h * elem_bytes < 8192 else (8 if block_h * elem_bytes <= 32768 else 16)
    return {"ROWS": rows, "num_warps": warps}


def _shape_key(H: int, dtype: torch.dtype) -> str:
    return f"H{H}_{str(dtype).removeprefix('torch.')}"


def _config(kernel: str, H: int, dtype: torch.dtype) -> dict:
    return tuning.best_config(kernel, _shape_key(H, dtype), _default_config(H, torch.finfo(dtype).bits // 8))


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """x[..., H], weight[H] -> (y[..., H] in x.dtype, rstd[...] fp32)."""
    H = _check(x, weight)
    return _forward(x, weight, eps, _config("rmsnorm_fwd", H, x.dtype))


def _forward(x, weight, eps, cfg):
    H = x.shape[-1]
    x2 = _rows(x, "x", H)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, H), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    _rmsnorm_fwd_kernel[(triton.cdiv(n_rows, cfg["ROWS"]),)](
        x2, weight, y, rstd,
        n_rows, H,
        x2.stride(0), y.stride(0),
        eps,
        ROWS=cfg["ROWS"], BLOCK_H=triton.next_power_of_2(H), num_warps=cfg["num_warps"],
    )
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rmsnorm_backward_into_dy_(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                              d_weight: torch.Tensor) -> torch.Tensor:
    """rmsnorm_backward writing dx over a contiguous dy[T, H] of x's dtype (the fused backward's dxn buffer)."""
    return _backward(dy, x, weight, rstd, d_weight, _config("rmsnorm_bwd", x.shape[-1], x.dtype), out=dy)


def rmsnorm_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x[T, H] -> rstd[T] fp32 (the statistics pass of the fused RMSNorm + matmul)."""
    H = x.shape[-1]
    x2 = _rows(x, "x", H)
    n_rows = x2.shape[0]
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    cfg = _config("rmsnorm_fwd", H, x.dtype)
    _rmsnorm_rstd_kernel[(triton.cdiv(n_rows, cfg["ROWS"]),)](
        x2, rstd, n_rows, H, x2.stride(0), eps,
        ROWS=cfg["ROWS"], BLOCK_H=triton.next_power_of_2(H), num_warps=cfg["num_warps"],
    )
    return rstd.view(x.shape[:-1])


def _n_programs(device: torch.device, n_blocks: int) -> int:
    """Persistent grid for the backward: a few programs per SM (asked at call time, never at import)."""
    if device.type == "cuda" and not tuning.interpreting():
        return max(1, min(n_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_blocks, 4))


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     d_weight: torch.Tensor) -> torch.Tensor:
    """Returns dx (x.dtype); accumulates dg into d_weight (fp32[H])."""
    H = _check(x, weight)
    if dy.shape != x.shape:
        raise ValueError(f"rmsnorm_backward: dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    if rstd.shape != x.shape[:-1] or rstd.dtype != torch.float32:
        raise ValueError(f"rmsnorm_backward: rstd must be fp32 {tuple(x.shape[:-1])}, "
                         f"got {rstd.dtype} {tuple(rstd.shape)} (pass the rstd rmsnorm_forward returned)")
    if d_weight.shape != (H,) or d_weight.dtype != torch.float32:
        raise ValueError(f"rmsnorm_backward: d_weight must be fp32[{H}], got {d_weight.dtype} "
                         f"{tuple(d_weight.shape)}")
    return _backward(dy, x, weight, rstd, d_weight, _config("rmsnorm_bwd", H, x.dtype))


def _backward(dy, x, weight, rstd, d_weight, cfg, out=None):
    """out: where dx goes; may be dy itself (each program reads its rows whole before it writes them)."""
    H = x.shape[-1]
    x2, dy2 = _rows(x, "x", H), _rows(dy, "dy", H)
    rstd2 = rstd.reshape(-1).contiguous()
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, H), dtype=x.dtype, device=x.device) if out is None else out.view(n_rows, H)
    grid = _n_programs(x.device, triton.cdiv(n_rows, cfg["ROWS"]))
    dg_partial = torch.empty((grid, H), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(grid,)](
        dy2, x2, weight, rstd2, dx, dg_partial,
        n_rows, H,
        dy2.stride(0), x2.stride(0), dx.stride(0),
        ROWS=cfg["ROWS"], BLOCK_H=triton.next_power_of_2(H), num_warps=cfg["num_warps"],
    )
    d_weight += dg_partial.sum(0)
    return dx.view(x.shape)


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test): ROWS per program
# and warps. GB/s counts the bytes each pass must move: forward 2·T·H, backward 3·T·H elements.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [dict(T=8192, H=4096), dict(T=8192, H=8192), dict(T=8192 * 32, H=128)]


def candidates(H: int) -> list[dict]:
    block_h = triton.next_power_of_2(H)
    return [{"ROWS": r, "num_warps": w} for r in (1, 2, 4, 8, 16, 32, 64) for w in (1, 2, 4, 8, 16)
            if r * block_h <= 65536 and r * block_h >= 32 * w]


def autotune(shape: dict | None = None) -> list[dict]:
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    rows_out = []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        T, H = s["T"], s["H"]
        x = torch.randn(T, H, device=dev, dtype=dtype)
        w = (1 + 0.1 * torch.randn(H, device=dev)).to(dtype)
        dy = torch.randn_like(x)
        y_ref, rstd = rmsnorm_forward_ref(x, w, 1e-6)
        dx_ref = rmsnorm_backward_ref(dy, x, w, rstd, torch.zeros(H, device=dev))
        d_w = torch.zeros(H, device=dev, dtype=torch.float32)
        key = _shape_key(H, dtype)
        for kernel, run, check, n_bytes in (
            ("rmsnorm_fwd", lambda c: _forward(x, w, 1e-6, c),
             lambda c: sweep.max_rel_error(_forward(x, w, 1e-6, c)[0], y_ref), 2 * T * H * 2),
            ("rmsnorm_bwd", lambda c: _backward(dy, x, w, rstd, d_w, c),
             lambda c: sweep.max_rel_error(_backward(dy, x, w, rstd, d_w, c), dx_ref), 3 * T * H * 2),
        ):
            cfg, ms = sweep.fastest(kernel, candidates(H), run, check)
            tuning.store_config(kernel, key, cfg)
            rows_out.append(dict(shape=dict(kernel=kernel, T=T, H=H, dtype="bf16"), config=cfg, ms=ms,
                                 throughput=f"{n_bytes / ms / 1e6:.0f} GB/s"))
    return rows_out
