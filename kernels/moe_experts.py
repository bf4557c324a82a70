"""Mixture-of-experts experts in Triton: grouped GEMMs over all experts in one launch each, without padding, and
the weighted combination of each token's k expert outputs, forward and backward.

The token slots s = t·k + j come sorted by expert from moe_routing.moe_permute (order[T·k], offsets[E + 1]):
expert e owns the sorted rows offsets[e] : offsets[e + 1], possibly none. W[e] is a strided [N, K] view.
    grouped GEMM   C[c_row(r)] = A[a_row(r)] @ W[e]ᵀ (+ b[e])  for every sorted row r, e its expert
                   gate_up forward  A = x,         a_row = order[r] // k,  c_row = r          (gather the tokens)
                   down forward     A = h,         a_row = r,              c_row = order[r]   (scatter to slots)
                   down backward    A = d_o,       a_row = order[r],       c_row = r,   B = W_d[e] (not ᵀ)
                   gate_up backward A = d_gate_up, a_row = r,              c_row = order[r], B = W_gu[e]
    weight grad    dW[e] += D[d_row(r)]ᵀ @ A[a_row(r)] over the rows of e,  db[e] += Σ_r D[d_row(r)]   (fp32)
    combine        y[t] = Σ_j w[t, j]·o[t·k + j];   backward d_o[s] = w[t, j]·dy[t],  d_w[t, j] = <dy[t], o[s]>
                   (the gate_up backward's dx is the combine of its per-slot dx with unit weights)
The grouped GEMM's programs walk M tiles packed expert after expert: each finds its expert from the offsets
(a cumulative sum of cdiv(rows_e, BLOCK_M) over ≤ 1024 experts, in registers), so no host sync and no padded
copy; the grid is sized for the worst case, cdiv(T·k, BLOCK_M) + min(E, T·k) tiles; programs past the last exit.
Every dW program owns one [BLOCK_N, BLOCK_K] tile of one expert (in the interpreter: of every expert in turn)
and loops over that expert's rows: no atomics, deterministic, and an expert with no rows adds nothing.
FLOPs: each grouped GEMM 2·T·k·N·K; each dW the same.

Supported range: activations (x, h, d_o, d_gate_up) with contiguous last axes; weights any strided [E, N, K]
view (gpt-oss's [E, K, N] parameters pass as .transpose(1, 2)) in the activation dtype (bf16, fp16 or fp32);
biases [E, N] and the fp32 gradient buffers any strides; E ≤ 1024; T·k < 2³¹.
Known gaps
- Triton's interpreter computes garbage for bf16 tl.dot: when ``tuning.interpreting()`` the tiles are upcast to
  fp32 (UPCAST), so CPU tests check the indexing and the sums, not the bf16 MMA.
- The per-slot buffers o and the dx slots are T·k·H: ScatterMoE's layout, simple and deterministic, not the
  least memory (a fused un-permute with atomics would not need them).
- dW programs of a crowded expert run longer than those of a quiet one (no split over rows): skewed routing
  leaves SMs idle at the end of the launch. No TMA or warp specialization.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import moe_combine_backward as moe_combine_backward_ref  # noqa: F401  (tests and benchmarks)
from .reference import moe_combine_forward as moe_combine_forward_ref  # noqa: F401
from .reference import moe_down_backward as moe_down_backward_ref  # noqa: F401
from .reference import moe_down_forward as moe_down_forward_ref  # noqa: F401
from .reference import moe_gate_up_backward as moe_gate_up_backward_ref  # noqa: F401
from .reference import moe_gate_up_forward as moe_gate_up_forward_ref  # noqa: F401

MAX_EXPERTS = 1024


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr, a_index_ptr, b_ptr, bias_ptr, c_ptr, c_index_ptr, offsets_ptr,
    # shapes
    N, K, E, a_div, max_tiles_m,
    # strides
    stride_a_m, stride_b_e, stride_b_k, stride_b_n, stride_bias_e, stride_c_m,
    # meta
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[c_index[r]] = A[a_index[r] // a_div] @ B[e] (+ bias[e]) for the BLOCK_M sorted rows of one tile."""
    # grouped ("swizzled") order over the worst-case tile grid: GROUP_M row tiles sweep the column tiles together
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(max_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    # this tile's expert e: the M tiles are packed expert after expert, cdiv(rows_e, BLOCK_M) each
    # (inline rather than a helper: the interpreter pays milliseconds per nested jit call)
    es = tl.arange(0, BLOCK_E)
    start = tl.load(offsets_ptr + es, mask=es < E, other=0)
    end = tl.load(offsets_ptr + es + 1, mask=es < E, other=0)
    tiles = tl.cdiv(end - start, BLOCK_M)
    last = tl.cumsum(tiles, 0)                                         # tiles up to and including expert e
    e = tl.sum((last <= tile_m).to(tl.int32), 0)                       # experts whose tiles all come before
    if e >= E:                                                         # past the last tile
        return
    mine = es == e
    row0 = tl.sum(tl.where(mine, start, 0), 0) + (tile_m - tl.sum(tl.where(mine, last - tiles, 0), 0)) * BLOCK_M
    row_end = tl.sum(tl.where(mine, end, 0), 0)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    a_rows = tl.load(a_index_ptr + rows, mask=row_ok, other=0) // a_div
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N                   # wrap, dropped by the store mask
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_a_m + rk[None, :]            # [BLOCK_M, BLOCK_K]
    b_ptrs = (b_ptr + e.to(tl.int64) * stride_b_e + rk.to(tl.int64)[:, None] * stride_b_k
              + rn.to(tl.int64)[None, :] * stride_b_n)                                    # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:                                                     # the interpreter's bf16 dot is wrong
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b_k
    rn_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e.to(tl.int64) * stride_bias_e + rn_out, mask=rn_out < N,
                       other=0.0).to(tl.float32)[None, :]
    c_rows = tl.load(c_index_ptr + rows, mask=row_ok, other=0)
    c_ptrs = c_ptr + c_rows.to(tl.int64)[:, None] * stride_c_m + rn_out[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (rn_out < N)[None, :])


@triton.jit
def _grouped_dw_kernel(
    # pointers
    d_ptr, d_index_ptr, a_ptr, a_index_ptr, dw_ptr, db_ptr, offsets_ptr,
    # shapes
    N, K, E, a_div, expert_step,
    # strides
    stride_d_m, stride_a_m, stride_dw_e, stride_dw_n, stride_dw_k, stride_db_e, stride_db_n,
    # meta
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dW[e][n tile, k tile] += Σ_r D[d_index[r]]ᵀ A[a_index[r] // a_div] over the rows r of expert e, for the
    experts e = program_id(1), + expert_step, ...; db[e][n tile] += Σ_r D[d_index[r]] in the first k tile."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_n, pid_k = pid // num_k, pid % num_k
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn_in, rk_in = rn % N, rk % K                                      # wrap, dropped by the store mask
    rr = tl.arange(0, BLOCK_R)
    mask = (rn < N)[:, None] & (rk < K)[None, :]
    for e in range(tl.program_id(1), E, expert_step):
        start = tl.load(offsets_ptr + e)
        end = tl.load(offsets_ptr + e + 1)
        if end > start:                                                # an expert with no rows adds nothing
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for r0 in range(start, end, BLOCK_R):
                rows = r0 + rr
                row_ok = rows < end
                d_rows = tl.load(d_index_ptr + rows, mask=row_ok, other=0)
                a_rows = tl.load(a_index_ptr + rows, mask=row_ok, other=0) // a_div
                d_t = tl.load(d_ptr + d_rows.to(tl.int64)[None, :] * stride_d_m + rn_in[:, None],
                              mask=row_ok[None, :], other=0.0)                            # Dᵀ [BLOCK_N, BLOCK_R]
                a = tl.load(a_ptr + a_rows.to(tl.int64)[:, None] * stride_a_m + rk_in[None, :],
                            mask=row_ok[:, None], other=0.0)                              # [BLOCK_R, BLOCK_K]
                if HAS_BIAS:
                    acc_b += tl.sum(d_t.to(tl.float32), axis=1)
                if UPCAST:                                             # the interpreter's bf16 dot is wrong
                    d_t, a = d_t.to(tl.float32), a.to(tl.float32)
                acc = tl.dot(d_t, a, acc, input_precision=PRECISION)
            e64 = tl.cast(e, tl.int64)                                 # E·N·K may pass 2³¹
            dw_ptrs = (dw_ptr + e64 * stride_dw_e + rn.to(tl.int64)[:, None] * stride_dw_n
                       + rk.to(tl.int64)[None, :] * stride_dw_k)
            tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask, other=0.0) + acc, mask=mask)
            if HAS_BIAS:
                if pid_k == 0:
                    db_ptrs = db_ptr + e64 * stride_db_e + rn.to(tl.int64) * stride_db_n
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=rn < N, other=0.0) + acc_b, mask=rn < N)


@triton.jit
def _combine_kernel(
    # pointers
    o_ptr, w_ptr, y_ptr,
    # shapes
    T, H,
    # strides
    stride_o_s, stride_y_t,
    # meta
    TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """y[t] = Σ_j w[t, j]·o[t·k + j] in fp32, one rounding."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < H)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(w_ptr + rows64 * TOP_K + j, mask=row_ok, other=0.0)
        o = tl.load(o_ptr + (rows64 * TOP_K + j)[:, None] * stride_o_s + cols[None, :], mask=mask, other=0.0)
        acc += w[:, None] * o.to(tl.float32)
    tl.store(y_ptr + rows64[:, None] * stride_y_t + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_kernel(
    # pointers
    dy_ptr, o_ptr, w_ptr, d_o_ptr, d_w_ptr,
    # shapes
    T, H,
    # strides
    stride_dy_t, stride_o_s, stride_do_s,
    # meta
    TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """d_o[t·k + j] = w[t, j]·dy[t];  d_w[t, j] = <dy[t], o[t·k + j]> (the program walks all of H)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    kcols = tl.arange(0, BLOCK_K)
    k_ok = kcols < TOP_K
    slots = rows64[:, None] * TOP_K + kcols[None, :]                                     # [ROWS, BLOCK_K]
    slot_ok = row_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + slots, mask=slot_ok, other=0.0)
    d_w = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy_t + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)                                            # [ROWS, BLOCK_H]
        mask3 = slot_ok[:, :, None] & col_ok[None, None, :]
        o = tl.load(o_ptr + slots[:, :, None] * stride_o_s + cols[None, None, :], mask=mask3,
                    other=0.0).to(tl.float32)                                             # [ROWS, BLOCK_K, BLOCK_H]
        d_w += tl.sum(o * dy[:, None, :], axis=2)
        tl.store(d_o_ptr + slots[:, :, None] * stride_do_s + cols[None, None, :],
                 (w[:, :, None] * dy[:, None, :]).to(d_o_ptr.dtype.element_ty), mask=mask3)
    tl.store(d_w_ptr + slots, d_w, mask=slot_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------------------
# the interpreter pays per program: wide N tiles; BLOCK_M and BLOCK_R small so that experts span several tiles
_INTERPRETER_GEMM = {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
_INTERPRETER_DW = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1}
# Untuned Hopper defaults. Expert GEMMs see T·k/E rows each (a few hundred to a few thousand at training batch
# sizes), so the M tile stays at 128 (a quiet expert pads at most one tile); dW programs reduce over the rows.
_HOPPER_GEMM = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# The dW tile stays at 128×64: its operands are gathered rows (a 64-bit address per element in registers), and
# at 128×128 it needs more than 255 registers (spills). The bias sum (a reduction of the D tile in registers)
# takes 32 rows a step: at 64 it spills under Triton 3.6 (the GPU machine's).
_HOPPER_DW = {"BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 64, "num_warps": 8, "num_stages": 3}
_HOPPER_DW_BIAS = {**_HOPPER_DW, "BLOCK_R": 32}
# fp32 operands take IEEE dots on the FMA units: small tiles that fit shared memory.
_FP32_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
_FP32_DW = {"BLOCK_N": 64, "BLOCK_K": 64, "BLOCK_R": 32, "num_warps": 8, "num_stages": 3}
_ELEMENTWISE = {"ROWS": 4, "BLOCK_H": 64, "num_warps": 4}
TOKEN_BUCKET_CAP = 32768


def _shape_key(M: int, N: int, K: int, E: int, dtype: torch.dtype) -> str:
    """Rows (T·k) bucketed to a power of two up to TOKEN_BUCKET_CAP; N, K, E and the dtype exact."""
    return f"M{min(triton.next_power_of_2(M), TOKEN_BUCKET_CAP)}_N{N}_K{K}_E{E}_{str(dtype).removeprefix('torch.')}"


def _config(kernel: str, M: int, N: int, K: int, E: int, dtype: torch.dtype) -> dict:
    """A dW kernel with the bias sum is its own entry, ``<kernel>_bias``: autotune (no biases) leaves it at its
    default."""
    dw = kernel.endswith(("_dw", "_dw_bias"))
    if tuning.interpreting():
        default = _INTERPRETER_DW if dw else _INTERPRETER_GEMM
    elif dtype == torch.float32:
        default = _FP32_DW if dw else _FP32_GEMM
    else:
        default = (_HOPPER_DW_BIAS if kernel.endswith("_bias") else _HOPPER_DW) if dw else _HOPPER_GEMM
    return tuning.best_config(kernel, _shape_key(M, N, K, E, dtype), default)


def _dot_args(dtype: torch.dtype) -> dict:
    upcast = tuning.interpreting()
    return {"UPCAST": upcast, "PRECISION": "ieee" if upcast or dtype == torch.float32 else "tf32"}


def _identity(n: int, device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=device)


def _grouped_gemm(a, a_index, a_div, b, stride_b_k, stride_b_n, bias, c, c_index, offsets, cfg) -> None:
    """Launch: C[c_index[r]] = A[a_index[r] // a_div] @ B[e] (+ bias[e]) with B[e] read through the strides."""
    M, E = c_index.shape[0], offsets.shape[0] - 1
    N, K = c.shape[1], a.shape[1]
    max_tiles_m = triton.cdiv(M, cfg["BLOCK_M"]) + min(E, M)      # each expert with rows adds ≤ 1 partial tile
    grid = (max_tiles_m * triton.cdiv(N, cfg["BLOCK_N"]),)
    _grouped_gemm_kernel[grid](
        a, a_index, b, c if bias is None else bias, c, c_index, offsets,
        N, K, E, a_div, max_tiles_m,
        a.stride(0), b.stride(0), stride_b_k, stride_b_n, 0 if bias is None else bias.stride(0), c.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_E=triton.next_power_of_2(E), GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **_dot_args(a.dtype))


def _grouped_dw(d, d_index, a, a_index, a_div, d_weight, d_bias, offsets, cfg) -> None:
    """Launch: d_weight[e] += Σ_r D[d_index[r]]ᵀ A[a_index[r] // a_div] (+ d_bias[e] += Σ_r D[d_index[r]])."""
    E, N, K = d_weight.shape
    # programs per tile, each taking every expert_step-th expert: one expert each on the GPU (E × tiles
    # programs); the interpreter, which pays milliseconds per program, walks all experts in one
    expert_step = 1 if tuning.interpreting() else E
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(K, cfg["BLOCK_K"]), expert_step)
    _grouped_dw_kernel[grid](
        d, d_index, a, a_index, d_weight, d_weight if d_bias is None else d_bias, offsets,
        N, K, E, a_div, expert_step,
        d.stride(0), a.stride(0), *d_weight.stride(), *((0, 0) if d_bias is None else d_bias.stride()),
        HAS_BIAS=d_bias is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_dot_args(a.dtype))


def _combine(o: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    T, k = weights.shape
    H = o.shape[1]
    y = torch.empty((T, H), dtype=o.dtype, device=o.device)
    cfg = tuning.best_config("moe_combine", f"H{H}_k{k}", _ELEMENTWISE)
    _combine_kernel[(triton.cdiv(T, cfg["ROWS"]), triton.cdiv(H, cfg["BLOCK_H"]))](
        o, weights, y, T, H, o.stride(0), y.stride(0), TOP_K=k, ROWS=cfg["ROWS"], BLOCK_H=cfg["BLOCK_H"],
        num_warps=cfg["num_warps"])
    return y


# ---- input checks ------------------------------------------------------------------------------------------
def _check_activation(t: torch.Tensor, label: str, name: str, dtype=None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name}: {label} must be 2-D, got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: {label} dtype {t.dtype} unsupported (float32, bfloat16 or float16)")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: {label} dtype {t.dtype} != {dtype}; cast it first")
    if t.shape[1] > 0 and t.stride(1) != 1:
        raise ValueError(f"{name}: {label}'s last axis must be contiguous (call .contiguous())")


def _check_routing(order: torch.Tensor, offsets: torch.Tensor, slots: int, name: str) -> int:
    if order.dtype != torch.int32 or offsets.dtype != torch.int32 or order.dim() != 1 or offsets.dim() != 1:
        raise TypeError(f"{name}: order and offsets must be 1-D int32 (what moe_permute returns), got "
                        f"{order.dtype} {tuple(order.shape)} and {offsets.dtype} {tuple(offsets.shape)}")
    if order.shape[0] != slots:
        raise ValueError(f"{name}: order has {order.shape[0]} slots, expected T·k = {slots}")
    E = offsets.shape[0] - 1
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"{name}: offsets must hold E + 1 values for 1 ≤ E ≤ {MAX_EXPERTS}, "
                         f"got {offsets.shape[0]}")
    return E


def _check_weight(w: torch.Tensor, E: int, K: int, dtype, label: str, name: str) -> int:
    if w.dim() != 3 or w.shape[0] != E or w.shape[2] != K:
        raise ValueError(f"{name}: {label} must be [E={E}, N, {K}], got {tuple(w.shape)} (gpt-oss's [E, K, N] "
                         "parameters: pass .transpose(1, 2))")
    if w.dtype != dtype:
        raise TypeError(f"{name}: {label} dtype {w.dtype} != activation dtype {dtype}; cast the weight first")
    return w.shape[1]


def _check_bias(bias, E: int, N: int, label: str, name: str) -> None:
    if bias is not None and bias.shape != (E, N):
        raise ValueError(f"{name}: {label} shape {tuple(bias.shape)} != (E, N) = {(E, N)}")


def _check_grads(d_weight, d_bias, shape, name: str) -> None:
    if d_weight is None and d_bias is not None:
        raise ValueError(f"{name}: d_bias without d_weight: one weight-gradient GEMM computes both; pass both or "
                         "neither (a frozen expert)")
    if d_weight is not None and (d_weight.shape != shape or d_weight.dtype != torch.float32):
        raise ValueError(f"{name}: d_weight must be fp32 {tuple(shape)} (the weight's shape), got "
                         f"{d_weight.dtype} {tuple(d_weight.shape)}")
    if d_bias is not None and (d_bias.shape != shape[:2] or d_bias.dtype != torch.float32):
        raise ValueError(f"{name}: d_bias must be fp32 {tuple(shape[:2])}, got {d_bias.dtype} {tuple(d_bias.shape)}")


# ---- public ops (the signatures of kernels/reference.py) ---------------------------------------------------
def moe_gate_up_forward(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int,
                        weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[T, H], weight[E, N, H], bias[E, N] -> gate_up[T·k, N] in expert order (x.dtype)."""
    name = "moe_gate_up_forward"
    _check_activation(x, "x", name)
    E = _check_routing(order, offsets, x.shape[0] * top_k, name)
    N = _check_weight(weight, E, x.shape[1], x.dtype, "weight", name)
    _check_bias(bias, E, N, "bias", name)
    M = order.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = _config("moe_gate_up_fwd", M, N, x.shape[1], E, x.dtype)
    _grouped_gemm(x, order, top_k, weight, weight.stride(2), weight.stride(1), bias, out, _identity(M, x.device),
                  offsets, cfg)
    return out


def moe_gate_up_backward(d_gate_up: torch.Tensor, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                         top_k: int, weight: torch.Tensor, d_weight: torch.Tensor,
                         d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """d_gate_up[T·k, N] (expert order) -> dx[T, H] (x.dtype); accumulates d_weight (fp32 [E, N, H]) and d_bias
    (fp32 [E, N]) in place (None: frozen, not computed)."""
    name = "moe_gate_up_backward"
    _check_activation(x, "x", name)
    _check_activation(d_gate_up, "d_gate_up", name, x.dtype)
    T, H = x.shape
    E = _check_routing(order, offsets, T * top_k, name)
    N = _check_weight(weight, E, H, x.dtype, "weight", name)
    if d_gate_up.shape != (T * top_k, N):
        raise ValueError(f"{name}: d_gate_up shape {tuple(d_gate_up.shape)} != (T·k, N) = {(T * top_k, N)}")
    _check_grads(d_weight, d_bias, (E, N, H), name)
    M = T * top_k
    identity = _identity(M, x.device)
    # dW_gu[e] += d_gate_upᵀ @ x[tokens of e]   (and db_gu)
    if d_weight is not None:
        _grouped_dw(d_gate_up, identity, x, order, top_k, d_weight, d_bias, offsets,
                    _config("moe_gate_up_dw" + ("_bias" if d_bias is not None else ""), M, N, H, E, x.dtype))
    # dx of every slot, scattered to slot order, then the k slots of each token summed
    dx_slots = torch.empty((M, H), dtype=x.dtype, device=x.device)
    _grouped_gemm(d_gate_up, identity, 1, weight, weight.stride(1), weight.stride(2), None, dx_slots, order,
                  offsets, _config("moe_gate_up_dx", M, H, N, E, x.dtype))
    return _combine(dx_slots, torch.ones((T, top_k), dtype=torch.float32, device=x.device))


def moe_down_forward(h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """h[T·k, I] (expert order), weight[E, H, I], bias[E, H] -> o[T·k, H] in slot order (h.dtype)."""
    name = "moe_down_forward"
    _check_activation(h, "h", name)
    M, I = h.shape
    E = _check_routing(order, offsets, M, name)
    N = _check_weight(weight, E, I, h.dtype, "weight", name)
    _check_bias(bias, E, N, "bias", name)
    out = torch.empty((M, N), dtype=h.dtype, device=h.device)
    cfg = _config("moe_down_fwd", M, N, I, E, h.dtype)
    _grouped_gemm(h, _identity(M, h.device), 1, weight, weight.stride(2), weight.stride(1), bias, out, order,
                  offsets, cfg)
    return out


def moe_down_backward(d_o: torch.Tensor, h: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                      weight: torch.Tensor, d_weight: torch.Tensor, d_bias: torch.Tensor | None = None) -> torch.Tensor:
    """d_o[T·k, H] (slot order) -> dh[T·k, I] (expert order, h.dtype); accumulates d_weight (fp32 [E, H, I]) and
    d_bias (fp32 [E, H]) in place (None: frozen, not computed)."""
    name = "moe_down_backward"
    _check_activation(h, "h", name)
    _check_activation(d_o, "d_o", name, h.dtype)
    M, I = h.shape
    E = _check_routing(order, offsets, M, name)
    N = _check_weight(weight, E, I, h.dtype, "weight", name)
    if d_o.shape != (M, N):
        raise ValueError(f"{name}: d_o shape {tuple(d_o.shape)} != (T·k, H) = {(M, N)}")
    _check_grads(d_weight, d_bias, (E, N, I), name)
    identity = _identity(M, h.device)
    # dW_d[e] += d_o[slots of e]ᵀ @ h[rows of e]   (and db_d)
    if d_weight is not None:
        _grouped_dw(d_o, order, h, identity, 1, d_weight, d_bias, offsets,
                    _config("moe_down_dw" + ("_bias" if d_bias is not None else ""), M, N, I, E, h.dtype))
    dh = torch.empty_like(h)
    _grouped_gemm(d_o, order, 1, weight, weight.stride(1), weight.stride(2), None, dh, identity, offsets,
                  _config("moe_down_dh", M, I, N, E, h.dtype))
    return dh


def moe_combine_forward(o: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """o[T·k, H] (slot order), weights[T, k] fp32 -> y[T, H] (o.dtype)."""
    _check_activation(o, "o", "moe_combine_forward")
    if weights.dim() != 2 or weights.dtype != torch.float32 or o.shape[0] != weights.numel():
        raise ValueError(f"moe_combine_forward: weights must be fp32 [T, k] with T·k = {o.shape[0]} rows of o, "
                         f"got {weights.dtype} {tuple(weights.shape)}")
    return _combine(o, weights.contiguous())


def moe_combine_backward(dy: torch.Tensor, o: torch.Tensor, weights: torch.Tensor):
    """dy[T, H] -> (d_o[T·k, H] in o.dtype, d_weights[T, k] fp32)."""
    name = "moe_combine_backward"
    _check_activation(o, "o", name)
    _check_activation(dy, "dy", name)
    T, k = weights.shape
    if dy.shape != (T, o.shape[1]) or o.shape[0] != T * k or weights.dtype != torch.float32:
        raise ValueError(f"{name}: dy {tuple(dy.shape)}, o {tuple(o.shape)} and fp32 weights "
                         f"{tuple(weights.shape)} must be [T, H], [T·k, H] and [T, k]")
    H = o.shape[1]
    d_o = torch.empty_like(o)
    d_weights = torch.empty((T, k), dtype=torch.float32, device=o.device)
    cfg = tuning.best_config("moe_combine_bwd", f"H{H}_k{k}", _ELEMENTWISE)
    _combine_bwd_kernel[(triton.cdiv(T, cfg["ROWS"]),)](
        dy, o, weights.contiguous(), d_o, d_weights, T, H, dy.stride(0), o.stride(0), d_o.stride(0),
        TOP_K=k, BLOCK_K=triton.next_power_of_2(k), ROWS=cfg["ROWS"], BLOCK_H=cfg["BLOCK_H"],
        num_warps=cfg["num_warps"])
    return d_o, d_weights


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test): the four grouped
# GEMMs and two dW GEMMs of an MoE layer on balanced routing, each candidate checked against the reference
# before it is timed (dh and dx are grouped GEMMs with W[e] itself: the references on the transposed views);
# TFLOPS = 2·T·k·N·K / time per GEMM.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [                      # (T tokens, H, I, E, k): gpt-oss-120b, Qwen3-235B-A22B, DeepSeek-V3
    dict(T=16384, H=2880, I=2880, E=128, k=4),
    dict(T=16384, H=4096, I=1536, E=128, k=8),
    dict(T=16384, H=7168, I=2048, E=256, k=8),
]
GEMM_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for bm in (64, 128) for bn in (64, 128, 256) for bk in (32, 64) for w in (4, 8) for s in (3, 4)
    if not (bm * bn >= 128 * 256 and w == 4) and not (bn == 256 and bk == 64 and s == 4)
]
DW_CANDIDATES = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_R": br, "num_warps": w, "num_stages": s}
    for bn in (64, 128) for bk in (64, 128) for br in (32, 64) for w in (4, 8) for s in (3, 4)
    if not (bn * bk >= 128 * 128 and w == 4)
]


def balanced_routing(T: int, E: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids[T, k] int32, order, offsets): token t goes to experts (t·k + j) mod E, so every expert gets T·k/E
    rows (benchmarks and autotuning)."""
    from .moe_routing import moe_permute
    ids = ((torch.arange(T, device=device)[:, None] * k + torch.arange(k, device=device)) % E).to(torch.int32)
    return (ids, *moe_permute(ids, E))


def autotune(shape: dict | None = None) -> list[dict]:
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    out = []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        T, H, I, E, k = s["T"], s["H"], s["I"], s["E"], s["k"]
        M = T * k
        _, order, offsets = balanced_routing(T, E, k, dev)
        identity = _identity(M, dev)
        rand = lambda *shape, scale=1.0: (scale * torch.randn(*shape, device=dev)).to(dtype)  # noqa: E731
        x, h, d_gate_up, d_o = rand(T, H), rand(M, I), rand(M, 2 * I), rand(M, H)
        w_gu, w_d = rand(E, 2 * I, H, scale=H ** -0.5), rand(E, H, I, scale=I ** -0.5)
        w_gu_t, w_d_t = w_gu.transpose(1, 2), w_d.transpose(1, 2)        # B = W[e] (not ᵀ): dx and dh
        # name: (A, a_index, a_div, W[e]ᵀ as strided [E, N, K], c_index, reference of C)
        gemms = {
            "moe_gate_up_fwd": (x, order, k, w_gu, identity, moe_gate_up_forward_ref(x, order, offsets, k, w_gu)),
            "moe_down_fwd": (h, identity, 1, w_d, order, moe_down_forward_ref(h, order, offsets, w_d)),
            "moe_down_dh": (d_o, order, 1, w_d_t, identity, moe_gate_up_forward_ref(d_o, order, offsets, 1, w_d_t)),
            "moe_gate_up_dx": (d_gate_up, identity, 1, w_gu_t, order,
                               moe_down_forward_ref(d_gate_up, order, offsets, w_gu_t)),
        }
        for name, (a, a_index, a_div, w, c_index, ref) in gemms.items():
            c = torch.empty_like(ref)

            def run(cfg, a=a, a_index=a_index, a_div=a_div, w=w, c_index=c_index, c=c):
                _grouped_gemm(a, a_index, a_div, w, w.stride(2), w.stride(1), None, c, c_index, offsets, cfg)
                return c
            out.append(_tune(name, GEMM_CANDIDATES, run, ref, M, w.shape[1], w.shape[2], s))
        # name: (D, d_index, A, a_index, a_div, dW shape)
        dws = {"moe_gate_up_dw": (d_gate_up, identity, x, order, k, w_gu.shape),
               "moe_down_dw": (d_o, order, h, identity, 1, w_d.shape)}
        for name, (d, d_index, a, a_index, a_div, dw_shape) in dws.items():
            dw = torch.zeros(dw_shape, device=dev)
            ref = torch.zeros_like(dw)
            for e, lo, hi in [(e, int(offsets[e]), int(offsets[e + 1])) for e in range(E)]:  # sync: reference only
                ref[e] += d[d_index[lo:hi].long()].float().t() @ a[a_index[lo:hi].long() // a_div].float()

            def run(cfg, d=d, d_index=d_index, a=a, a_index=a_index, a_div=a_div, dw=dw):
                dw.zero_()
                _grouped_dw(d, d_index, a, a_index, a_div, dw, None, offsets, cfg)
                return dw
            out.append(_tune(name, DW_CANDIDATES, run, ref, M, dw_shape[1], dw_shape[2], s))
    return out


def _tune(name: str, candidates: list[dict], run, ref: torch.Tensor, M: int, N: int, K: int, s: dict) -> dict:
    cfg, ms = sweep.fastest(name, candidates, run, lambda c: sweep.max_rel_error(run(c), ref))
    tuning.store_config(name, _shape_key(M, N, K, s["E"], torch.bfloat16), cfg)
    return dict(shape=dict(kernel=name, **s, dtype="bf16"), config=cfg, ms=ms,
                throughput=f"{2 * M * N * K / ms / 1e9:.0f} TFLOPS (2·T·k·N·K flops)")
