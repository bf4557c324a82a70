"""Fused RMSNorm + matmul in Triton: y = rmsnorm(x; g) @ Wᵀ without the normalized x ever stored.

Forward (two launches):
    1. row pass        rstd[t] = 1 / sqrt(mean_h x[t, h]² + eps)          (reads x once: T·H, cheap next to the GEMM)
    2. GEMM            y[t, n] = Σ_h xn[t, h] · W[n, h]
                       with each A tile normalized in registers as it is loaded:
                       xn[t, h] = round(round(x[t, h] · rstd[t]) · round(g[h]))     (round = activation dtype)
   The A tile is rounded exactly as the reference (and transformers) round the normalized activation, so the
   only difference from rmsnorm → matmul is the order of the fp32 accumulation.
Backward (three launches), with xn recomputed, never stored:
    1. GEMM            dxn[T, H] = dy @ W                                           (activation dtype, as the reference)
    2. GEMM            dW[N, H] += dyᵀ @ xn   computed as dWᵀ tiles = xnᵀ @ dy, so the recomputed xnᵀ is the A
                       operand (registers on Hopper) and dy the B operand; each program owns one [BLOCK_M, BLOCK_N]
                       tile of dWᵀ and adds it to the caller's fp32 d_weight (no atomics, deterministic).
    3. row pass        dx = rstd · (dxhat − xhat · mean(dxhat · xhat)),  dxhat = dxn · g,  dg += Σ_t dxn · xhat
                       (kernels/rmsnorm.py's backward kernel, writing dx over dxn)
FLOPs: forward 2·T·N·H; backward 4·T·N·H (dx GEMM + dW GEMM).
Each of the three GEMMs may instead run on torch (cuBLAS on CUDA) with the normalized input made whole as the
reference makes it (TORCH): autotune times it with the Triton tiles and stores it where it is the fastest; the
launchers take whatever is stored (``implementations()`` says which ran at a shape).

Supported range: x[T, H], W[N, H] in bf16, fp16 or fp32 (same dtype), contiguous last axes, any T, N, H ≥ 1
(H ≤ 32768 for the row passes). fp32 runs its dots in IEEE fp32 (slow but exact; the engine trains in bf16).
Known gaps
- Triton's interpreter computes garbage for bf16 tl.dot: when ``tuning.interpreting()`` the tiles are upcast to
  fp32 (UPCAST constexpr), so CPU tests check the tiling and the normalization, not the bf16 MMA.
- The normalization sits in the GEMM's K loop (an elementwise pass over each A tile); whether that keeps pace
  with cuBLAS on the pre-normalized input must be measured on the GPU (perf/test_rmsnorm_matmul_perf.py).
- No TMA descriptors / warp specialization; dxn is written once in the backward (the row reduction
  mean(dxhat · xhat) spans all of H, i.e. all N-tiles of the dx GEMM).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import rmsnorm_matmul_backward as rmsnorm_matmul_backward_ref  # noqa: F401  (tests/benchmarks)
from .reference import rmsnorm_matmul_forward as rmsnorm_matmul_forward_ref  # noqa: F401
from .reference import matmul_accumulate_
from .rmsnorm import rmsnorm_backward_into_dy_, rmsnorm_rstd


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") order: GROUP_M row tiles sweep the column tiles together, so B tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b; UPCAST (interpreter only) feeds fp32 copies, since its bf16 dot is wrong."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _normalized(x, rstd, g, act: tl.constexpr):
    """round(round(x · rstd) · g) in the activation dtype: the reference's rounding of the normalized input.
    x, rstd and g come broadcast to one tile shape; g is already rounded to the activation dtype."""
    return ((x * rstd).to(act).to(tl.float32) * g).to(act)


@triton.jit
def _rmsnorm_matmul_fwd_kernel(
    # pointers
    x_ptr, g_ptr, rstd_ptr, w_ptr, y_ptr,
    # shapes
    T, N, H,
    # strides
    stride_x_t, stride_w_n, stride_y_t,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[BLOCK_M, BLOCK_N] tile = normalize(x tile) @ W tileᵀ, K loop over H."""
    pid_m, pid_n = _tile_ids(T, N, BLOCK_M, BLOCK_N, GROUP_M)
    act = x_ptr.dtype.element_ty
    # rows and columns wrap instead of being masked (their results are dropped by the store mask)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % T
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    rstd = tl.load(rstd_ptr + rm)                                                     # [BLOCK_M] fp32
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_x_t + rk[None, :]            # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_w_n + rk[:, None]            # [BLOCK_K, BLOCK_N] = Wᵀ
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = rk < H - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + k * BLOCK_K + rk, mask=k_ok, other=0.0).to(act).to(tl.float32)
        a = _normalized(x, rstd[:, None], g[None, :], act)                            # normalized A tile
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    rm_out = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + rm_out.to(tl.int64)[:, None] * stride_y_t + rn_out[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm_out < T)[:, None] & (rn_out < N)[None, :])


@triton.jit
def _matmul_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr,
    # shapes
    M, N, K,
    # strides
    stride_a_m, stride_b_k, stride_c_m,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """c[M, N] = a[M, K] @ b[K, N], all row-major (the backward's dxn = dy @ W)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a_m + rk[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_b_k + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b_k
    rm_out = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rm_out.to(tl.int64)[:, None] * stride_c_m + rn_out[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm_out < M)[:, None] & (rn_out < N)[None, :])


@triton.jit
def _rmsnorm_matmul_dw_kernel(
    # pointers
    x_ptr, g_ptr, rstd_ptr, dy_ptr, dw_ptr,
    # shapes
    T, N, H,
    # strides
    stride_x_t, stride_dy_t, stride_dw_n,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dWᵀ[BLOCK_M (h), BLOCK_N (n)] tile = xnᵀ @ dy, K loop over tokens; added to d_weight[n, h] in place."""
    pid_h, pid_n = _tile_ids(H, N, BLOCK_M, BLOCK_N, GROUP_M)
    act = x_ptr.dtype.element_ty
    rh = (pid_h * BLOCK_M + tl.arange(0, BLOCK_M)) % H
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    rt = tl.arange(0, BLOCK_K)
    g = tl.load(g_ptr + rh).to(act).to(tl.float32)                                  # [BLOCK_M]
    x_ptrs = x_ptr + rt.to(tl.int64)[None, :] * stride_x_t + rh[:, None]           # [BLOCK_M, BLOCK_K] = xᵀ
    dy_ptrs = dy_ptr + rt.to(tl.int64)[:, None] * stride_dy_t + rn[None, :]        # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(T, BLOCK_K)):
        t_ok = rt < T - k * BLOCK_K
        x = tl.load(x_ptrs, mask=t_ok[None, :], other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + k * BLOCK_K + rt, mask=t_ok, other=0.0)          # [BLOCK_K]
        a = _normalized(x, rstd[None, :], g[:, None], act)                            # xnᵀ tile, recomputed
        b = tl.load(dy_ptrs, mask=t_ok[:, None], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PRECISION)
        x_ptrs += BLOCK_K * stride_x_t
        dy_ptrs += BLOCK_K * stride_dy_t
    rh_out = pid_h * BLOCK_M + tl.arange(0, BLOCK_M)
    rn_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dw_ptrs = dw_ptr + rn_out.to(tl.int64)[None, :] * stride_dw_n + rh_out[:, None]   # d_weight[n, h] as [h, n]
    mask = (rh_out < H)[:, None] & (rn_out < N)[None, :]
    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=mask, other=0.0) + acc, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launch functions
# ----------------------------------------------------------------------------------------------------------
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}
_TILE_128x128 = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
_TILE_128x256 = {**_TILE_128x128, "BLOCK_N": 256}
# Untuned defaults for Hopper. The forward normalizes each A tile in registers (≈5 ALU ops per element per K
# step): a 128×256 tile doubles the MMA work per normalized element, so that work hides behind the tensor cores.
# The dW GEMM stays at 128×128: at 128×256 its recomputed xnᵀ tile pushes it past 255 registers (spills).
_HOPPER_DEFAULTS = {"rmsnorm_matmul_fwd": _TILE_128x256, "rmsnorm_matmul_dx": _TILE_128x256,
                    "rmsnorm_matmul_dw": _TILE_128x128}
# fp32 operands take IEEE dots on the FMA units (no tensor cores): small tiles, and 4-byte tiles must still fit
# in shared memory (a 128×256×64 fp32 pipeline would need 288 KB).
_FP32_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
# a GEMM's other choice: torch (cuBLAS on CUDA) on the normalized input made as the reference makes it; autotune
# stores it for a GEMM where it is faster than every Triton tile
TORCH = {"impl": "torch"}


TOKEN_BUCKET_CAP = 32768   # micro-batches of 32K tokens and more share the largest bucket, which autotune tunes


def _shape_key(T: int, N: int, H: int, dtype: torch.dtype) -> str:
    """T is bucketed to a power of two up to TOKEN_BUCKET_CAP (micro-batches vary); N, H and the dtype are
    exact. DEFAULT_SHAPES below use bucket values of T, so the keys they store are the keys the engine asks."""
    return f"T{min(triton.next_power_of_2(T), TOKEN_BUCKET_CAP)}_N{N}_H{H}_{str(dtype).removeprefix('torch.')}"


def _config(kernel: str, T: int, N: int, H: int, dtype: torch.dtype) -> dict:
    if tuning.interpreting():
        default = _INTERPRETER_CONFIG
    else:
        default = _FP32_DEFAULT if dtype == torch.float32 else _HOPPER_DEFAULTS[kernel]
    return tuning.best_config(kernel, _shape_key(T, N, H, dtype), default)


def _dot_args(dtype: torch.dtype) -> dict:
    """UPCAST works around the interpreter's bf16 dot; fp32 operands get IEEE dots, not TF32."""
    upcast = tuning.interpreting()
    return {"UPCAST": upcast, "PRECISION": "ieee" if upcast or dtype == torch.float32 else "tf32"}


def implementation(cfg: dict) -> str:
    """Which implementation a stored or default choice runs: "torch" (cuBLAS) or "triton"."""
    return cfg.get("impl", "triton")


def implementations(T: int, N: int, H: int, dtype: torch.dtype) -> dict:
    """{GEMM: "triton" | "torch"}: what each of the three GEMMs runs at this shape on this device."""
    return {kernel: implementation(_config(kernel, T, N, H, dtype))
            for kernel in ("rmsnorm_matmul_fwd", "rmsnorm_matmul_dx", "rmsnorm_matmul_dw")}


def _normalized_input(x: torch.Tensor, g: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """xn[T, H] rounded as the reference (and the kernels' A tiles) round it: for the torch GEMMs."""
    return (x.float() * rstd[:, None]).to(x.dtype) * g.to(x.dtype)


def _forward_gemm(cfg: dict, x, g, rstd, weight, y) -> None:
    """y = xn @ Wᵀ by the choice ``cfg``."""
    T, N, H = x.shape[0], weight.shape[0], x.shape[1]
    if implementation(cfg) == "torch":
        torch.mm(_normalized_input(x, g, rstd), weight.t(), out=y)
        return
    _launch_gemm(_rmsnorm_matmul_fwd_kernel, (T, N), cfg,
                 (x, g, rstd, weight, y, T, N, H, x.stride(0), weight.stride(0), y.stride(0)), x.dtype)


def _dx_gemm(cfg: dict, dy, weight, dxn) -> None:
    """dxn = dy @ W by the choice ``cfg``."""
    (T, N), H = dy.shape, weight.shape[1]
    if implementation(cfg) == "torch":
        torch.mm(dy, weight, out=dxn)
        return
    _launch_gemm(_matmul_kernel, (T, H), cfg,
                 (dy, weight, dxn, T, H, N, dy.stride(0), weight.stride(0), dxn.stride(0)), dxn.dtype)


def _dw_gemm(cfg: dict, x, g, rstd, dy, d_weight) -> None:
    """d_weight += dyᵀ @ xn by the choice ``cfg``."""
    (T, H), N = x.shape, dy.shape[1]
    if implementation(cfg) == "torch":
        matmul_accumulate_(d_weight, dy.t(), _normalized_input(x, g, rstd))
        return
    _launch_gemm(_rmsnorm_matmul_dw_kernel, (H, N), cfg,
                 (x, g, rstd, dy, d_weight, T, N, H, x.stride(0), dy.stride(0), d_weight.stride(0)), x.dtype)


def _launch_gemm(kernel, grid_mn: tuple[int, int], cfg: dict, args: tuple, dtype: torch.dtype) -> None:
    M, N = grid_mn
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    kernel[grid](*args, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                 GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                 **_dot_args(dtype))


def _check(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, name: str) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{name}: x must be [T, H] and weight [N, H], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)} (flatten batch × sequence into T first)")
    T, H = x.shape
    N = weight.shape[0]
    if T == 0 or N == 0 or H == 0:
        raise ValueError(f"{name}: empty shape T={T}, N={N}, H={H}")
    if weight.shape[1] != H:
        raise ValueError(f"{name}: weight is [{N}, {weight.shape[1]}] but x has H={H} columns")
    if norm_weight.shape != (H,):
        raise ValueError(f"{name}: norm_weight shape {tuple(norm_weight.shape)} != ({H},)")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: x dtype {x.dtype} unsupported (float32, bfloat16 or float16)")
    if weight.dtype != x.dtype:
        raise TypeError(f"{name}: weight dtype {weight.dtype} != x dtype {x.dtype}; cast the weight first")
    for label, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1:
            raise ValueError(f"{name}: {label}'s last axis must be contiguous (strides {t.stride()})")
    for label, t in (("norm_weight", norm_weight), ("weight", weight)):
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device}, x on {x.device}")
    return T, N, H


def rmsnorm_matmul_forward(x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, eps: float):
    """x[T, H], norm_weight[H], weight[N, H] -> (y[T, N] in x.dtype, rstd[T] fp32)."""
    T, N, H = _check(x, norm_weight, weight, "rmsnorm_matmul_forward")
    rstd = rmsnorm_rstd(x, eps)                                                       # [T] fp32
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    g = norm_weight.contiguous()
    _forward_gemm(_config("rmsnorm_matmul_fwd", T, N, H, x.dtype), x, g, rstd, weight, y)
    return y, rstd


def rmsnorm_matmul_backward(dy: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor,
                            rstd: torch.Tensor, d_weight: torch.Tensor, d_norm_weight: torch.Tensor) -> torch.Tensor:
    """dy[T, N] -> dx[T, H]; accumulates dW (fp32[N, H]) and dg (fp32[H]) in place."""
    T, N, H = _check(x, norm_weight, weight, "rmsnorm_matmul_backward")
    if dy.shape != (T, N) or dy.dtype != x.dtype:
        raise ValueError(f"rmsnorm_matmul_backward: dy must be {x.dtype} {(T, N)}, got {dy.dtype} {tuple(dy.shape)}")
    if rstd.shape != (T,) or rstd.dtype != torch.float32:
        raise ValueError(f"rmsnorm_matmul_backward: rstd must be fp32 ({T},), got {rstd.dtype} "
                         f"{tuple(rstd.shape)} (pass the rstd the forward returned)")
    if d_weight.shape != (N, H) or d_weight.dtype != torch.float32 or d_weight.stride(1) != 1:
        raise ValueError(f"rmsnorm_matmul_backward: d_weight must be a row-contiguous fp32 [{N}, {H}], "
                         f"got {d_weight.dtype} {tuple(d_weight.shape)}")
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    rstd = rstd.contiguous()
    g = norm_weight.contiguous()
    # 1. dxn = dy @ W, rounded to the activation dtype as the reference's linear_backward returns it
    dxn = torch.empty((T, H), dtype=x.dtype, device=x.device)
    _dx_gemm(_config("rmsnorm_matmul_dx", T, N, H, x.dtype), dy, weight, dxn)
    # 2. dW += dyᵀ @ xn with xn recomputed tile by tile (or made whole for cuBLAS)
    _dw_gemm(_config("rmsnorm_matmul_dw", T, N, H, x.dtype), x, g, rstd, dy, d_weight)
    # 3. through the norm: dx (written over dxn: one [T, H] buffer in all) and dg, in one row pass
    return rmsnorm_backward_into_dy_(dxn, x, norm_weight, rstd, d_norm_weight)


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test): a Hopper-oriented
# sweep per GEMM, each candidate checked against torch before it is timed; TFLOPS = 2·T·N·H / time per GEMM.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [                  # the engine's micro-batches: 32K tokens (and more), 8K, a short 2K one
    *(dict(T=T, H=4096, N=6144) for T in (32768, 8192, 2048)),   # Llama-3-8B qkv (32 + 2·8 heads × 128)
    *(dict(T=T, H=4096, N=28672) for T in (32768, 8192)),        # Llama-3-8B gate_up (2 × 14336)
    dict(T=32768, H=5120, N=7168),                               # Qwen2.5-14B/32B-style qkv
    dict(T=32768, H=8192, N=10240),                              # Llama-3-70B qkv (64 + 2·8 heads × 128)
    dict(T=32768, H=8192, N=57344),                              # Llama-3-70B gate_up (2 × 28672)
]
def _tile(bm, bn, bk, warps, stages):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}


# Hopper candidates per GEMM (bf16), each compiled for sm_90a without register spills, within an H100's 227 KB
# of shared memory, its dot a wgmma (tests/test_rmsnorm_matmul.py); cut from a 41-tile grid whose larger tiles
# spilled or overflowed shared memory.
CANDIDATES = [_tile(128, 256, 64, 8, 3), _tile(128, 256, 32, 8, 4), _tile(128, 128, 64, 8, 3),
              _tile(128, 128, 64, 8, 4), _tile(128, 128, 32, 8, 4), _tile(128, 128, 64, 4, 3),
              _tile(64, 256, 64, 4, 3), _tile(128, 64, 64, 4, 4), _tile(64, 128, 64, 4, 4)]


def gemm_candidates(kernel: str) -> list[dict]:
    """CANDIDATES for one GEMM, and TORCH. The dW GEMM recomputes the normalized xnᵀ tile as its A operand in
    registers: its fp32 accumulator may take at most 64 registers a thread (128×256 on 8 warps, 128×128 or 64×256
    on 4 spill on sm_90a)."""
    if kernel == "rmsnorm_matmul_dw":
        return [TORCH] + [c for c in CANDIDATES if c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c["num_warps"]]
    return [TORCH] + CANDIDATES


def autotune(shape: dict | None = None) -> list[dict]:
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    out = []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        T, H, N = s["T"], s["H"], s["N"]
        x = torch.randn(T, H, device=dev, dtype=dtype)
        g = (1 + 0.1 * torch.randn(H, device=dev)).to(dtype)
        w = (torch.randn(N, H, device=dev) / H ** 0.5).to(dtype)
        dy = torch.randn(T, N, device=dev, dtype=dtype)
        rstd = rmsnorm_rstd(x, 1e-6)
        y_ref, _ = rmsnorm_matmul_forward_ref(x, g, w, 1e-6)
        xn = (x.float() * rstd[:, None]).to(dtype) * g                                  # [T, H]
        dxn_ref, dw_ref = dy @ w, dy.float().t() @ xn.float()
        y, dxn = torch.empty(T, N, device=dev, dtype=dtype), torch.empty(T, H, device=dev, dtype=dtype)
        d_w = torch.zeros(N, H, device=dev, dtype=torch.float32)

        def fresh_dw(cfg):
            d_w.zero_()
            _dw_gemm(cfg, x, g, rstd, dy, d_w)
            return d_w

        gemms = {  # name: (run(cfg), check(cfg) -> error); the torch choice's time includes making xn
            "rmsnorm_matmul_fwd": (lambda c: _forward_gemm(c, x, g, rstd, w, y),
                                   lambda c: sweep.max_rel_error((_forward_gemm(c, x, g, rstd, w, y), y)[1], y_ref)),
            "rmsnorm_matmul_dx": (lambda c: _dx_gemm(c, dy, w, dxn),
                                  lambda c: sweep.max_rel_error((_dx_gemm(c, dy, w, dxn), dxn)[1], dxn_ref)),
            "rmsnorm_matmul_dw": (lambda c: _dw_gemm(c, x, g, rstd, dy, d_w),
                                  lambda c: sweep.max_rel_error(fresh_dw(c), dw_ref)),
        }
        key = _shape_key(T, N, H, dtype)
        for name, (run, check) in gemms.items():
            cfg, ms = sweep.fastest(name, gemm_candidates(name), run, check)
            tuning.store_config(name, key, cfg)
            out.append(dict(shape=dict(kernel=name, T=T, H=H, N=N, dtype="bf16"), config=cfg, ms=ms,
                            implementation=implementation(cfg),
                            throughput=f"{2 * T * N * H / ms / 1e9:.0f} TFLOPS (2·T·N·H flops)"))
    return out
