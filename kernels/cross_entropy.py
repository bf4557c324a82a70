"""Fused linear cross-entropy in Triton: loss, d(hidden) and d(lm_head) without the whole [T, V] logits.

For each chunk of C tokens (h_c = h[chunk], W the lm_head [V, H]):
    logits = h_c @ Wᵀ                                            [C, V] in h.dtype (fp32 accumulation)
    lse_t  = log Σ_v exp(logits_tv)                              (fp32; from per-tile max/sum written by the
                                                                  logits GEMM's epilogue, or an online pass)
    loss  += Σ_{t: y_t ≠ -100} lse_t − logits_t,y_t
    g      = grad_scale · (exp(logits − lse) − onehot(y))        written in place over the logits, in h.dtype;
                                                                  rows with y_t = -100 get g = 0
    dh_c   = g @ W                                               [C, H] in h.dtype
    dW    += gᵀ @ h_c                                            [V, H] fp32, accumulated in place
The semantics are those of ``reference.linear_cross_entropy`` (re-exported here as ``linear_cross_entropy_ref``),
including the rounding of the logits to h.dtype before the softmax. The one extra rounding is g, stored in
h.dtype (bf16) so the two backward GEMMs run on tensor cores at full rate.

Memory: one logits buffer [min(C, T), V] in h.dtype (rows padded to 16 elements), its tile statistics
[2, C, V / BLOCK_N] fp32, dh [T, H] and a [T] fp32 per-token loss; nothing of size T × V. With C = 4096,
V = 128256 in bf16 the buffer is 1.05 GB.

Work: 3 GEMMs of 2·C·H·V flops per chunk (6·T·H·V in all), plus the row kernel's read and write of the logits
chunk (a second read when the logits came from torch), plus dW's read-modify-write of the fp32 [V, H] buffer
once per chunk (why larger chunks are faster). Each GEMM is the Triton kernel below or torch (cuBLAS); which,
and the block sizes and warps, come from ``tuning.best_config("cross_entropy", ...)``, written by ``autotune()``,
which also checks every candidate against the reference on the GPU before timing it (``check_error``).

Vocabulary chunks (the engine's head streamed through a staging slot V_c rows at a time; the maths in
reference.py): ``cross_entropy_chunk_stats_`` (pass 1: the logits GEMM, then _chunk_stats_kernel merges each
row's max and Σ exp into running fp32 statistics and picks the target's logit) and
``cross_entropy_chunk_backward`` (pass 2: the logits GEMM again, _chunk_grad_kernel writes g in place from the
global lse and each token's scale, one number or per-token weights for a sequence-level objective such as DPO,
then dh += g @ W_c and dW_c += gᵀ @ h, both accumulating in fp32), built from the same GEMMs and row loops. Against the fused op, the chunked head costs one more logits GEMM (8·T·H·V flops instead of 6·T·H·V)
and a [T, H] fp32 dh accumulator; its logits buffer is [min(C, T), V_c].

Supported: h, weight in bf16 or fp32 (same dtype), any strides; targets int32/int64 in [0, V) or -100;
any T ≥ 0 (odd T, last chunk short), any V (odd V, V not a multiple of the block).
Known gaps:
- the GEMMs are plain (non-persistent, no TMA, no warp specialization) Triton tiles: their H100 speed relative
  to cuBLAS is unmeasured here; autotune falls back to cuBLAS per GEMM where that is faster;
- fp32 inputs use exact fp32 (``input_precision="ieee"``) dots: correct but far from tensor-core speed;
- the ``torch`` choice for dW is ``reference.matmul_accumulate_`` (cuBLAS with an fp32 output on CUDA; chunked
  upcasts on CPU, a test-only path). The default dW GEMM is the Triton one;
- target ids are checked without a sync on CUDA: a device-side assert (``torch._assert_async``) stops a bad id
  from being read out of bounds, but it surfaces as a CUDA error at the next sync, not as a ValueError naming
  the token (the engine checks the labels on the host before they reach the device). On CPU the check is a
  host check that names the token.
- In the Triton interpreter (tests) ``tl.dot`` on bf16 operands is wrong, so there (constexpr INTERPRETER, true
  only when ``tuning.interpreting()``) the GEMM upcasts its tiles to fp32. The interpreter's fp32 → bf16 cast
  truncates; the tests patch it to round to nearest as the GPU does (tests/kernel_checks.py).
- g in bf16 adds an error of the order of the bf16 reference's own; with a tiny vocabulary and one token
  (V = 2, T = 1) dh's error can reach ~3× the reference's, which the tests' 2× rule would reject.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import IGNORE_INDEX, matmul_accumulate_
from .reference import linear_cross_entropy as linear_cross_entropy_ref  # noqa: F401  (tests, benchmarks)

KERNEL = "cross_entropy"
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)

# One GEMM's choice: {"impl": "triton", BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages} or
# {"impl": "torch"}. The row kernel's choice: {BLOCK_V, num_warps}.
_GEMM_BF16 = dict(impl="triton", BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
_GEMM_BF16_ACC = dict(impl="triton", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
_GEMM_FP32 = dict(impl="triton", BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
_TORCH = dict(impl="torch")


def default_config(dtype: torch.dtype) -> dict:
    """Untuned choice: Triton GEMMs for the logits and dW (fp32 accumulation in place), cuBLAS for dh."""
    if dtype == torch.float32:
        return dict(logits=_GEMM_FP32, dh=_TORCH, dw=_GEMM_FP32, row=dict(BLOCK_V=4096, num_warps=8))
    # dW's epilogue also holds the fp32 tile of d_weight it adds to: a narrower tile keeps it out of spills
    return dict(logits=_GEMM_BF16, dh=_TORCH, dw=_GEMM_BF16_ACC, row=dict(BLOCK_V=4096, num_warps=8))


def shape_key(dtype: torch.dtype, H: int, V: int, chunk: int) -> str:
    return f"{str(dtype).removeprefix('torch.')}_H{H}_V{V}_C{chunk}"


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_product(
    # pointers
    a_ptr, b_ptr,
    # shapes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn,
    # meta
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """This program's tile of A[M, K] @ B[K, N] in fp32 -> (acc, offs_m, offs_n, pid_n).

    Programs are ordered in groups of GROUP_M tile rows so the tiles running together share their A and B
    panels in L2. Edges are masked rather than wrapped (offs % M) so the compiler still sees BLOCK-long
    contiguous runs along whichever of M, N, K has unit stride (dW reads gᵀ, whose contiguous axis is M = V)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak    # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn    # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_ok[None, :], other=0.0)
        if INTERPRETER:                     # the interpreter's tl.dot on bf16 operands is wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, offs_m, offs_n, pid_n


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # shapes
    M, N, K,
    # strides
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    # meta
    ACCUMULATE: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] (+)= A[M, K] @ B[K, N], fp32 accumulation, any strides (a transpose is a stride swap).

    With ACCUMULATE the old C (fp32) is added, which is how dW += gᵀ h stays in place without atomics (each
    tile has one owner)."""
    acc, offs_m, offs_n, _ = _tile_product(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                                           INTERPRETER, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _logits_kernel(
    # pointers
    h_ptr, w_ptr, logits_ptr, tile_max_ptr, tile_sum_ptr,
    # shapes
    n_rows, V, H,
    # strides
    stride_h, stride_w, stride_logits, stride_stats,
    # meta
    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """logits[n, V] = h[n, H] @ W[V, H]ᵀ in the logits dtype, plus softmax statistics of each row's piece of
    this tile, from the rounded values the row kernel will read back:
        tile_max[t, j] = max_v x_tv,   tile_sum[t, j] = Σ_v exp(x_tv − tile_max[t, j])    (v in tile column j)
    so the row kernel gets logsumexp from V / BLOCK_N numbers instead of a pass over the row."""
    acc, offs_m, offs_n, pid_n = _tile_product(h_ptr, w_ptr, n_rows, V, H, stride_h, 1, 1, stride_w,
                                               INTERPRETER, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    m_ok = offs_m < n_rows
    n_ok = offs_n < V
    x = acc.to(logits_ptr.dtype.element_ty)                                             # [BLOCK_M, BLOCK_N]
    rows64 = offs_m.to(tl.int64)
    tl.store(logits_ptr + rows64[:, None] * stride_logits + offs_n[None, :], x,
             mask=m_ok[:, None] & n_ok[None, :])
    xf = tl.where(n_ok[None, :], x.to(tl.float32), float("-inf"))   # every tile has a column < V: max is finite
    tile_max = tl.max(xf, axis=1)                                                        # [BLOCK_M]
    tile_sum = tl.sum(tl.exp(xf - tile_max[:, None]), axis=1)
    tl.store(tile_max_ptr + rows64 * stride_stats + pid_n, tile_max, mask=m_ok)
    tl.store(tile_sum_ptr + rows64 * stride_stats + pid_n, tile_sum, mask=m_ok)


@triton.jit
def _loss_and_grad(
    # pointers
    row_ptr, loss_ptr,
    # shapes
    V, V_alloc,
    # meta
    row, target, lse, grad_scale,
    IGNORE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Given the row's logsumexp: loss_t = lse − x[y] (0 when ignored), then the row [V] at row_ptr is
    overwritten with g = scale·(softmax − onehot) in its own dtype (scale = 0 on ignored rows). In the loop
    each element is loaded and stored by the same lane; the barrier covers the one cross-lane read, x[y].
    Loads and stores run to V_alloc ≥ V (the row's allocated width, a multiple of 16 in the launcher's buffer)
    so that an odd V does not break them into scalar accesses; columns V..V_alloc get g = 0."""
    valid = target != IGNORE
    safe_target = tl.where(valid, target, 0)
    picked = tl.load(row_ptr + safe_target).to(tl.float32)
    # every warp reads x[y] (a scalar load runs in all threads) before any warp overwrites the row with g
    tl.debug_barrier()
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    _write_grad_row(row_ptr, V, V_alloc, lse, safe_target, tl.where(valid, grad_scale, 0.0), BLOCK_V)


@triton.jit
def _write_grad_row(row_ptr, V, V_alloc, lse, one_hot_col, scale, BLOCK_V: tl.constexpr):
    """Overwrites the row's logits x with scale·(exp(x − lse) − [v = one_hot_col]) in their own dtype. Each
    element is loaded and stored by the same lane; loads and stores run to V_alloc ≥ V (see _loss_and_grad)."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        in_alloc = start + cols < V_alloc
        x = tl.load(row_ptr + start + cols, mask=in_alloc, other=0.0).to(tl.float32)
        x = tl.where(start + cols < V, x, float("-inf"))
        g = tl.exp(x - lse) - tl.where(start + cols == one_hot_col, 1.0, 0.0)
        tl.store(row_ptr + start + cols, (g * scale).to(row_ptr.dtype.element_ty), mask=in_alloc)


@triton.jit
def _row_max_sum(row_ptr, V, V_alloc, BLOCK_V: tl.constexpr):
    """(max, Σ exp(x − max)) of the row's V values, fp32, in one online pass: a running max m and sum s per lane
    (s·exp(m) = Σ exp over the lane's columns so far), the lanes folded once at the end."""
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V_alloc, other=0.0).to(tl.float32)
        x = tl.where(start + cols < V, x, float("-inf"))
        m_new = tl.maximum(m, x)
        # lanes past V stay at m = -inf, s = 0: shift them by 0 instead of -inf so no -inf - -inf = NaN appears
        shift = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    return m_row, tl.sum(s * tl.exp(m - m_row), axis=0)


@triton.jit
def _softmax_grad_kernel(
    # pointers
    logits_ptr, targets_ptr, loss_ptr,
    # shapes
    V, V_alloc,
    # strides
    stride_row,
    # meta
    grad_scale,
    IGNORE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per token row whose logits came without statistics (torch GEMM): an online logsumexp pass
    over the row, then _loss_and_grad."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m_row, s_row = _row_max_sum(row_ptr, V, V_alloc, BLOCK_V)
    _loss_and_grad(row_ptr, loss_ptr, V, V_alloc, row, tl.load(targets_ptr + row), m_row + tl.log(s_row),
                   grad_scale, IGNORE, BLOCK_V)


@triton.jit
def _softmax_grad_from_stats_kernel(
    # pointers
    logits_ptr, targets_ptr, loss_ptr, tile_max_ptr, tile_sum_ptr,
    # shapes
    V, V_alloc, n_tiles,
    # strides
    stride_row, stride_stats,
    # meta
    grad_scale,
    IGNORE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_TILES: tl.constexpr,
):
    """One program per token row whose logits came from _logits_kernel: logsumexp from the per-tile
    statistics, lse = M + log Σ_j tile_sum_j · exp(tile_max_j − M) with M = max_j tile_max_j, then
    _loss_and_grad. The row itself is read once and written once."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_TILES)
    tile_max = tl.load(tile_max_ptr + row * stride_stats + j, mask=j < n_tiles, other=float("-inf"))
    tile_sum = tl.load(tile_sum_ptr + row * stride_stats + j, mask=j < n_tiles, other=0.0)
    m_row = tl.max(tile_max, axis=0)
    lse = m_row + tl.log(tl.sum(tile_sum * tl.exp(tile_max - m_row), axis=0))
    _loss_and_grad(logits_ptr + row * stride_row, loss_ptr, V, V_alloc, row, tl.load(targets_ptr + row), lse,
                   grad_scale, IGNORE, BLOCK_V)


@triton.jit
def _chunk_stats_kernel(
    # pointers
    logits_ptr, targets_ptr, row_max_ptr, row_sum_ptr, target_logit_ptr,
    # shapes
    V_c, V_alloc, start,
    # strides
    stride_row,
    # meta
    BLOCK_V: tl.constexpr,
):
    """Pass 1 of the vocabulary-chunked cross-entropy, one program per token row of a chunk's logits [n, V_c]:
    merges the row's (max, Σ exp) into the running (row_max, row_sum),
        M = max(m, m_c),   s ← s·exp(m − M) + s_c·exp(m_c − M),
    and records the target's logit when the target id falls in [start, start + V_c)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m_c, s_c = _row_max_sum(row_ptr, V_c, V_alloc, BLOCK_V)
    m_old = tl.load(row_max_ptr + row)
    m_new = tl.maximum(m_old, m_c)                      # finite: every chunk has a column
    s_new = tl.load(row_sum_ptr + row) * tl.exp(m_old - m_new) + s_c * tl.exp(m_c - m_new)
    tl.store(row_max_ptr + row, m_new)
    tl.store(row_sum_ptr + row, s_new)
    local = tl.load(targets_ptr + row) - start          # the ignore index is negative: never inside
    inside = (local >= 0) & (local < V_c)
    picked = tl.load(row_ptr + tl.where(inside, local, 0)).to(tl.float32)
    tl.store(target_logit_ptr + row, picked, mask=inside)


@triton.jit
def _chunk_grad_kernel(
    # pointers
    logits_ptr, targets_ptr, lse_ptr, scale_ptr,
    # shapes
    V_c, V_alloc, start,
    # strides
    stride_row, stride_scale,
    # meta
    IGNORE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pass 2, one program per token row: overwrites the chunk's logits row with
    g = s_t · (exp(x − lse) − [v = y − start]) in its own dtype (0 on ignored rows, columns ≥ V_c), where the
    token's scale s_t = scale_ptr[row · stride_scale]: stride 0 for one scale of every token (the mean loss), 1 for
    per-token weights (a sequence-level objective, DPO)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row * stride_scale)
    # a target outside the chunk (or ignored: negative) matches no column
    _write_grad_row(row_ptr, V_c, V_alloc, lse, target - start, tl.where(target != IGNORE, scale, 0.0), BLOCK_V)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or tuning.interpreting() else "tf32"


def _matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, cfg: dict, accumulate: bool = False) -> None:
    """c (+)= a @ b with the GEMM choice ``cfg``; a, b, c are 2-D views of any strides."""
    (M, K), N = a.shape, b.shape[1]
    if cfg["impl"] == "torch":
        if accumulate:                      # bf16 operands, fp32 accumulator: cuBLAS with beta = 1
            matmul_accumulate_(c, a, b)
        else:
            torch.mm(a, b, out=c)
        return
    if M == 0 or N == 0:
        return
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, c,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        ACCUMULATE=accumulate, INTERPRETER=tuning.interpreting(), PRECISION=_precision(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _logits(hc: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, cfg: dict):
    """logits[n, V] = hc @ Wᵀ. The Triton choice also returns the per-tile (max, sum) statistics [n, V/BLOCK_N]
    for the row kernel; the torch choice returns None (the row kernel then makes its own pass)."""
    if cfg["impl"] == "torch":
        _matmul(hc, weight.t(), logits, cfg)
        return None
    (n, H), V = hc.shape, weight.shape[0]
    if hc.stride(1) != 1 or weight.stride(1) != 1:
        hc, weight = hc.contiguous(), weight.contiguous()   # the kernel assumes unit stride along H
    n_tiles = triton.cdiv(V, cfg["BLOCK_N"])
    stats = torch.empty(2, n, n_tiles, dtype=torch.float32, device=hc.device)        # [max | sum, n, tiles]
    if n:
        _logits_kernel[(triton.cdiv(n, cfg["BLOCK_M"]) * n_tiles,)](
            hc, weight, logits, stats[0], stats[1],
            n, V, H,
            hc.stride(0), weight.stride(0), logits.stride(0), stats.stride(1),
            INTERPRETER=tuning.interpreting(), PRECISION=_precision(hc.dtype),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return stats


def _softmax_grad_(logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor, grad_scale: float,
                   cfg: dict, stats: torch.Tensor | None) -> None:
    """In place over logits[n, V] (unit column stride): per-row loss into loss_rows[n], then g."""
    n, V = logits.shape
    if n == 0:
        return
    meta = dict(IGNORE=IGNORE_INDEX, BLOCK_V=min(cfg["BLOCK_V"], triton.next_power_of_2(V)),
                num_warps=cfg["num_warps"])
    V_alloc = logits.stride(0)              # the buffer's rows are allocated out to their stride
    if stats is None:
        _softmax_grad_kernel[(n,)](logits, targets, loss_rows, V, V_alloc, logits.stride(0), float(grad_scale),
                                   **meta)
    else:
        _softmax_grad_from_stats_kernel[(n,)](
            logits, targets, loss_rows, stats[0], stats[1],
            V, V_alloc, stats.shape[2],
            logits.stride(0), stats.stride(1),
            float(grad_scale),
            BLOCK_TILES=triton.next_power_of_2(stats.shape[2]), **meta,
        )


def _check_inputs(h, weight, targets, d_weight, chunk_size) -> None:
    if h.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_cross_entropy: h must be [T, H] and weight [V, H]; got h{list(h.shape)}, "
                         f"weight{list(weight.shape)} (flatten batch × sequence into T first)")
    T, H = h.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"linear_cross_entropy: weight is {list(weight.shape)} but h has hidden size {H}; "
                         f"weight must be [vocab_size, {H}]")
    if h.dtype not in SUPPORTED_DTYPES or weight.dtype != h.dtype:
        raise TypeError(f"linear_cross_entropy: h and weight must share one dtype among bf16/fp32; got "
                        f"h {h.dtype}, weight {weight.dtype}")
    if targets.shape != (T,) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be int64/int32 [{T}] (one per token of h); got "
                         f"{targets.dtype} {list(targets.shape)}")
    if d_weight is not None and (d_weight.shape != (V, H) or d_weight.dtype != torch.float32):
        raise ValueError(f"linear_cross_entropy: d_weight must be the fp32 [{V}, {H}] gradient buffer of the "
                         f"lm_head; got {d_weight.dtype} {list(d_weight.shape)}")
    devices = {t.device for t in (h, weight, targets, d_weight) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"linear_cross_entropy: h, weight, targets and d_weight must be on one device; got "
                         f"{sorted(str(d) for d in devices)}")
    if h.device.type != "cuda" and not tuning.interpreting():
        raise RuntimeError("linear_cross_entropy (Triton) needs CUDA tensors, or TRITON_INTERPRET=1 for the "
                           "interpreter; the CPU path is kernels.reference.linear_cross_entropy")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    if T:
        bad = (targets >= V) | ((targets < 0) & (targets != IGNORE_INDEX))
        if targets.is_cuda:
            # no sync inside a training step (the engine checks labels on the host): a device-side assert
            # stops a bad target from being read out of bounds
            torch._assert_async(~bad.any(), "linear_cross_entropy: a target id is outside [0, vocab_size)")
        elif bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"linear_cross_entropy: token {t} has target id {int(targets[t])}, outside "
                             f"[0, vocab_size={V}) and not the ignore index {IGNORE_INDEX}")


def _run(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, d_weight: torch.Tensor,
         grad_scale: float, chunk_size: int, config: dict):
    """The chunk loop with an explicit config (tests and autotune call it directly)."""
    T, H = h.shape
    V = weight.shape[0]
    targets = targets.contiguous()
    dh = torch.empty_like(h)
    loss_rows = torch.zeros(T, dtype=torch.float32, device=h.device)        # [T] per-token loss
    rows = min(chunk_size, T)
    # rows padded to 16 elements: aligned, and a row width the JIT sees as divisible by 16 (vector accesses)
    buf = torch.empty(rows, triton.cdiv(V, 16) * 16, dtype=h.dtype, device=h.device)
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        hc = h[start:stop]                                                  # [n, H]
        logits = buf[:stop - start, :V]                                     # [n, V], becomes g in place
        stats = _logits(hc, weight, logits, config["logits"])
        _softmax_grad_(logits, targets[start:stop], loss_rows[start:stop], grad_scale, config["row"], stats)
        _matmul(logits, weight, dh[start:stop], config["dh"])               # dh_c = g @ W       [n, H]
        if d_weight is not None:                                            # None: a frozen lm_head
            _matmul(logits.t(), hc, d_weight, config["dw"], accumulate=True)    # dW += gᵀ @ h_c     [V, H]
    return loss_rows.sum(), dh


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, d_weight: torch.Tensor,
                         grad_scale: float, chunk_size: int = 4096):
    """h[T, H], weight[V, H], targets[T] int64 (-100 = ignored), d_weight fp32[V, H] accumulated in place.

    -> (loss_sum: fp32 scalar tensor, dh[T, H] in h.dtype). Same contract as reference.linear_cross_entropy."""
    _check_inputs(h, weight, targets, d_weight, chunk_size)
    H, V = h.shape[1], weight.shape[0]
    config = tuning.best_config(KERNEL, shape_key(h.dtype, H, V, chunk_size), default_config(h.dtype))
    return _run(h, weight, targets, d_weight, grad_scale, chunk_size, config)


def _chunk_setup(name, h, weight, targets, token_chunk, fp32_buffers):
    """The chunked ops' checks, GEMM config and logits buffer [min(token_chunk, T), V_c] (rows padded to 16).
    Target ids are not checked here: they span the whole vocabulary, and the engine checks them on the host."""
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1] or weight.shape[0] < 1:
        raise ValueError(f"{name}: h must be [T, H] and weight a chunk of lm_head rows [V_c ≥ 1, H]; got "
                         f"h{list(h.shape)}, weight{list(weight.shape)}")
    if h.dtype not in SUPPORTED_DTYPES or weight.dtype != h.dtype:
        raise TypeError(f"{name}: h and weight must share one dtype among bf16/fp32; got h {h.dtype}, "
                        f"weight {weight.dtype}")
    if targets.shape != h.shape[:1] or any(t.dtype != torch.float32 for t in fp32_buffers):
        raise ValueError(f"{name}: targets must be [{h.shape[0]}] and the statistics/gradient buffers fp32")
    if h.device.type != "cuda" and not tuning.interpreting():
        raise RuntimeError(f"{name} (Triton) needs CUDA tensors, or TRITON_INTERPRET=1 for the interpreter; the "
                           f"CPU path is kernels.reference.{name}")
    H, V_c = weight.shape[1], weight.shape[0]
    config = tuning.best_config(KERNEL, shape_key(h.dtype, H, V_c, token_chunk), default_config(h.dtype))
    buf = torch.empty(min(token_chunk, h.shape[0]), triton.cdiv(V_c, 16) * 16, dtype=h.dtype, device=h.device)
    return config, buf


def _scale_rows(grad_scale, T: int, device) -> tuple[torch.Tensor, int]:
    """(scales, stride) for _chunk_grad_kernel: per-token weights as they are (stride 1), or one number in a
    one-element tensor that every row reads (stride 0)."""
    if not isinstance(grad_scale, torch.Tensor):
        return torch.full((1,), float(grad_scale), dtype=torch.float32, device=device), 0
    if grad_scale.shape != (T,) or grad_scale.dtype != torch.float32:
        raise ValueError(f"cross_entropy_chunk_backward: per-token grad_scale must be fp32 [{T}] (one weight a "
                         f"token), got {grad_scale.dtype} {list(grad_scale.shape)}")
    return grad_scale.contiguous(), 1


def cross_entropy_chunk_stats_(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, start: int,
                               row_max: torch.Tensor, row_sum: torch.Tensor, target_logit: torch.Tensor,
                               token_chunk: int = 4096) -> None:
    """Pass 1 for one vocabulary chunk (weight = lm_head rows [start, start + V_c)); same contract as
    reference.cross_entropy_chunk_stats_. Work: one GEMM of 2·T·H·V_c flops and one read of the logits."""
    config, buf = _chunk_setup("cross_entropy_chunk_stats_", h, weight, targets, token_chunk,
                               (row_max, row_sum, target_logit))
    V_c = weight.shape[0]
    targets = targets.contiguous()
    row_cfg = config["row"]
    for s in range(0, h.shape[0], token_chunk):
        e = min(s + token_chunk, h.shape[0])
        logits = buf[:e - s, :V_c]                                          # [n, V_c]
        _matmul(h[s:e], weight.t(), logits, config["logits"])
        _chunk_stats_kernel[(e - s,)](logits, targets[s:e], row_max[s:e], row_sum[s:e], target_logit[s:e],
                                      V_c, logits.stride(0), start, logits.stride(0),
                                      BLOCK_V=min(row_cfg["BLOCK_V"], triton.next_power_of_2(V_c)),
                                      num_warps=row_cfg["num_warps"])


def cross_entropy_chunk_backward(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, start: int,
                                 lse: torch.Tensor, grad_scale, dh: torch.Tensor, d_weight: torch.Tensor | None,
                                 token_chunk: int = 4096) -> None:
    """Pass 2 for one vocabulary chunk; same contract as reference.cross_entropy_chunk_backward (grad_scale one
    number or fp32 [T] per-token weights). g is stored in h.dtype (as in linear_cross_entropy), dh and d_weight
    accumulate in fp32. Work: 3 GEMMs of 2·T·H·V_c."""
    config, buf = _chunk_setup("cross_entropy_chunk_backward", h, weight, targets, token_chunk,
                               tuple(t for t in (lse, dh, d_weight) if t is not None))
    T, V_c = h.shape[0], weight.shape[0]
    scales, stride_scale = _scale_rows(grad_scale, T, h.device)
    targets = targets.contiguous()
    row_cfg = config["row"]
    for s in range(0, T, token_chunk):
        e = min(s + token_chunk, T)
        hc, logits = h[s:e], buf[:e - s, :V_c]                              # [n, H], [n, V_c]
        _matmul(hc, weight.t(), logits, config["logits"])
        _chunk_grad_kernel[(e - s,)](logits, targets[s:e], lse[s:e], scales[s * stride_scale:],
                                     V_c, logits.stride(0), start, logits.stride(0), stride_scale,
                                     IGNORE=IGNORE_INDEX,
                                     BLOCK_V=min(row_cfg["BLOCK_V"], triton.next_power_of_2(V_c)),
                                     num_warps=row_cfg["num_warps"])
        _matmul(logits, weight, dh[s:e], config["dh"], accumulate=True)     # dh += g @ W_c      [n, H]
        if d_weight is not None:                                            # None: a frozen lm_head
            _matmul(logits.t(), hc, d_weight, config["dw"], accumulate=True)    # dW_c += gᵀ @ h     [V_c, H]


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU only; python -m horizon_triton.kernels.autotune cross_entropy)
# ----------------------------------------------------------------------------------------------------------
# Hopper candidates for the three GEMMs (bf16) and cuBLAS; each Triton one compiles for sm_90a without register
# spills, within an H100's 227 KB of shared memory, its dot a wgmma (tests/test_cross_entropy.py).
_GEMM_CANDIDATES = [
    dict(impl="triton", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
                             (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4),
                             (128, 64, 64, 4, 4)]
] + [_TORCH]


def gemm_candidates(role: str) -> list[dict]:
    """_GEMM_CANDIDATES for one GEMM role ("logits", "dh", "dw"). dW's epilogue also holds the fp32 tile of
    d_weight it adds to: its accumulator may take at most 64 registers a thread (128×128 or 64×256 on 4 warps
    spill on sm_90a)."""
    if role == "dw":
        return [c for c in _GEMM_CANDIDATES
                if c["impl"] == "torch" or c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"]]
    return _GEMM_CANDIDATES


_ROW_CANDIDATES = [dict(BLOCK_V=bv, num_warps=w) for bv in (1024, 2048, 4096, 8192) for w in (4, 8, 16)]
AUTOTUNE_DEVICE = "cuda"   # the tests point it at the CPU interpreter to dry-run the sweep
CHECK_TOKENS = 300         # tokens of the correctness check each candidate passes before it is timed
_DEFAULT_SHAPES = [dict(T=8192, H=4096, V=128256), dict(T=8192, H=3584, V=152064), dict(T=8192, H=2048, V=128256)]


def check_error(config: dict, H: int, V: int, device, tokens: int = 300) -> float:
    """Runs ``config`` on a small bf16 problem (odd T in chunks of 128, some tokens ignored) on ``device`` and
    returns its worst error ratio err / (2·err(bf16 reference) + atol) over the loss, dh and dW, all errors
    against the fp32 reference: ≤ 1 is correct (STYLE.md's rule), NaN counts as infinitely wrong."""
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, H, device=device, generator=gen).bfloat16()
    weight = (torch.randn(V, H, device=device, generator=gen) * 2 / H ** 0.5).bfloat16()
    targets = torch.randint(0, V, (tokens,), device=device, generator=gen)
    targets[::11] = IGNORE_INDEX
    outs = []
    for hh, ww, fn in ((h.float(), weight.float(), linear_cross_entropy_ref), (h, weight, linear_cross_entropy_ref),
                       (h, weight, lambda *args: _run(*args, config))):
        d_weight = torch.zeros(V, H, device=device)
        loss, dh = fn(hh, ww, targets, d_weight, 1.0 / tokens, 128)
        outs.append((loss.double(), dh.double(), d_weight.double()))
    worst = 0.0
    for exact, ref, got in zip(*outs):
        err_ref, err = (ref - exact).abs().max().item(), (got - exact).abs().max().item()
        ratio = err / (2 * err_ref + 1e-5 * max(exact.abs().max().item(), 1e-3))
        worst = max(worst, ratio if ratio == ratio else float("inf"))
    return worst


def autotune(shape: dict | None = None) -> list[dict]:
    """Sweeps GEMM blocks/warps/stages (or cuBLAS) for each of the three GEMMs, the row kernel's block and warps,
    for chunk sizes 2048/4096/8192 (or shape["chunk"]), bf16; stores each chunk's winner and returns one row per
    (shape, chunk) with the whole call's time and TFLOPS (6·T·H·V flops)."""
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    rows = []
    for shp in ([shape] if shape else _DEFAULT_SHAPES):
        T, H, V = shp["T"], shp["H"], shp["V"]
        h = torch.randn(T, H, device=dev, dtype=dtype)
        weight = torch.randn(V, H, device=dev, dtype=dtype) / H ** 0.5
        targets = torch.randint(0, V, (T,), device=dev)
        d_weight = torch.zeros(V, H, device=dev, dtype=torch.float32)
        for chunk in ([shp["chunk"]] if "chunk" in shp else [c for c in (2048, 4096, 8192) if c <= max(T, 2048)]):
            n = min(chunk, T)
            hc = h[:n]
            logits = torch.empty(n, V, device=dev, dtype=dtype)
            loss_rows = torch.empty(n, device=dev, dtype=torch.float32)
            dh = torch.empty(n, H, device=dev, dtype=dtype)
            cfg = default_config(dtype)

            def pick(role, candidates, run):   # candidates for one role, checked with the rest of cfg so far
                check = lambda c: check_error({**cfg, role: c}, H, V, dev, CHECK_TOKENS)  # noqa: E731
                cfg[role] = sweep.fastest(f"cross_entropy {role} (C={chunk})", candidates, run, check, tol=1.0)[0]
            pick("logits", gemm_candidates("logits"), lambda c: _logits(hc, weight, logits, c))
            # logits must hold finite values for the row kernel; g stays finite when rerun in place
            stats = _logits(hc, weight, logits, cfg["logits"])
            pick("row", _ROW_CANDIDATES, lambda c: _softmax_grad_(logits, targets[:n], loss_rows, 1.0 / T, c, stats))
            pick("dh", gemm_candidates("dh"), lambda c: _matmul(logits, weight, dh, c))
            pick("dw", gemm_candidates("dw"), lambda c: _matmul(logits.t(), hc, d_weight, c, accumulate=True))
            del logits
            ms = tuning.time_ms(lambda: _run(h, weight, targets, d_weight, 1.0 / T, chunk, cfg), warmup=2, rep=10)
            tuning.store_config(KERNEL, shape_key(dtype, H, V, chunk), cfg)
            rows.append(dict(shape=dict(T=T, H=H, V=V, chunk=chunk, dtype="bf16"), config=cfg, ms=ms,
                             throughput=f"{6 * T * H * V / ms / 1e9:.0f} TFLOPS (6·T·H·V flops)"))
        del h, weight, d_weight
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows
