"""Rotary position embedding in place, rotate-half convention (transformers' Llama, Mistral, Qwen2, Qwen3).

With x = [x1 | x2] split at D/2 and cos = [c1 | c2], sin = [s1 | s2] (transformers builds both halves equal):
    forward:   y1 = x1 · c1 − x2 · s1,     y2 = x2 · c2 + x1 · s2
    backward:  the inverse rotation, i.e. the forward with −sin:
               dx1 = dy1 · c1 + dy2 · s1,  dx2 = dy2 · c2 − dy1 · s2
(the halves are read separately, so cos/sin whose halves differ still give the reference's result).
Arithmetic in fp32, one rounding to the activation dtype on the store.

Layout: x[T, nH, D] (q or k, possibly a strided view into a fused qkv buffer; the last axis must be
contiguous), cos/sin [T, D] fp32 contiguous. One program rotates HEADS heads of one token, so cos/sin are
read once per token and head group.
Supported range: even D ≤ 2048 (typical 64-256).
Known gaps: q and k are two launches (no fused qk kernel); no partial rotary (rotary_dim < D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sweep, tuning
from .reference import rope_backward_ as rope_backward_ref_  # noqa: F401  (tests and benchmarks use it)
from .reference import rope_forward_ as rope_forward_ref_  # noqa: F401


@triton.jit
def _rope_kernel(
    # pointers
    x_ptr, cos_ptr, sin_ptr,
    # shapes
    n_heads, HALF,
    # strides
    stride_x_t, stride_x_h, stride_cs_t,
    # meta
    INVERSE: tl.constexpr, HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """In place on HEADS heads of token program_id(0); INVERSE rotates by −θ (the backward)."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    mask = (heads < n_heads)[:, None] & col_ok[None, :]
    cs = t * stride_cs_t + cols
    c1 = tl.load(cos_ptr + cs, mask=col_ok, other=0.0)[None, :]
    c2 = tl.load(cos_ptr + cs + HALF, mask=col_ok, other=0.0)[None, :]
    s1 = tl.load(sin_ptr + cs, mask=col_ok, other=0.0)[None, :]
    s2 = tl.load(sin_ptr + cs + HALF, mask=col_ok, other=0.0)[None, :]
    if INVERSE:
        s1 = -s1
        s2 = -s2
    p1 = x_ptr + t * stride_x_t + heads[:, None] * stride_x_h + cols[None, :]   # [HEADS, BLOCK_HALF]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    act = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * c1 - x2 * s1).to(act), mask=mask)
    tl.store(p1 + HALF, (x2 * c2 + x1 * s2).to(act), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be [T, nH, D], got shape {tuple(x.shape)}")
    T, _, D = x.shape
    if D % 2 or D > 2048:
        raise ValueError(f"{name}: head dim D={D} must be even and ≤ 2048")
    if x.stride(2) != 1:
        raise ValueError(f"{name}: x's last axis must be contiguous (strides {x.stride()})")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: x dtype {x.dtype} unsupported (float32, bfloat16 or float16)")
    for label, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D):
            raise ValueError(f"{name}: {label} must be [T, D] = {(T, D)}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: {label} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: {label} is on {t.device}, x on {x.device}")
    if cos.stride() != sin.stride() or cos.stride(1) != 1:
        raise ValueError(f"{name}: cos and sin must be contiguous with equal strides "
                         f"({cos.stride()} vs {sin.stride()}); call .contiguous()")


def _key(nH: int, D: int, dtype: torch.dtype) -> str:
    return f"nH{nH}_D{D}_{str(dtype).removeprefix('torch.')}"


def _config(nH: int, D: int, dtype: torch.dtype) -> dict:
    default = ({"HEADS": 2, "num_warps": 1} if tuning.interpreting()
               else {"HEADS": max(1, min(triton.next_power_of_2(nH), 1024 // triton.next_power_of_2(D // 2))),
                     "num_warps": 4})
    return tuning.best_config("rope", _key(nH, D, dtype), default)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool, cfg: dict) -> torch.Tensor:
    T, nH, D = x.shape
    if T == 0 or nH == 0:
        return x
    _rope_kernel[(T, triton.cdiv(nH, cfg["HEADS"]))](
        x, cos, sin,
        nH, D // 2,
        x.stride(0), x.stride(1), cos.stride(0),
        INVERSE=inverse, HEADS=cfg["HEADS"], BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=cfg["num_warps"],
    )
    return x


def rope_forward_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on x[T, nH, D]; cos, sin [T, D] fp32. Returns x."""
    _check(x, cos, sin, "rope_forward_")
    return _launch(x, cos, sin, False, _config(x.shape[1], x.shape[2], x.dtype))


def rope_backward_(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place on dy[T, nH, D]: turns d(rotated) into d(unrotated). Returns dy."""
    _check(dy, cos, sin, "rope_backward_")
    return _launch(dy, cos, sin, True, _config(dy.shape[1], dy.shape[2], dy.dtype))


# ----------------------------------------------------------------------------------------------------------
# Autotuning (GPU; AUTOTUNE_DEVICE is swapped for "cpu" in the interpreter's dry-run test). One config serves
# both directions (same kernel, same traffic). GB/s counts the read and write of x plus cos/sin.
# ----------------------------------------------------------------------------------------------------------
AUTOTUNE_DEVICE = "cuda"
DEFAULT_SHAPES = [dict(T=8192, nH=32, D=128), dict(T=8192, nH=8, D=128), dict(T=8192, nH=64, D=128)]


def candidates(nH: int) -> list[dict]:
    return [{"HEADS": h, "num_warps": w} for h in (1, 2, 4, 8, 16, 32, 64) for w in (1, 2, 4, 8)
            if h <= triton.next_power_of_2(nH)]


def autotune(shape: dict | None = None) -> list[dict]:
    dtype, dev = torch.bfloat16, AUTOTUNE_DEVICE
    out = []
    for s in ([shape] if shape else DEFAULT_SHAPES):
        T, nH, D = s["T"], s["nH"], s["D"]
        x = torch.randn(T, nH, D, device=dev, dtype=dtype)
        angle = torch.randn(T, D // 2, device=dev).repeat(1, 2)
        cos, sin = angle.cos(), angle.sin()
        ref = rope_forward_ref_(x.clone(), cos, sin)
        work = x.clone()                       # timed runs rotate it again and again: norms are kept
        cfg, ms = sweep.fastest("rope", candidates(nH), lambda c: _launch(work, cos, sin, False, c),
                                lambda c: sweep.max_rel_error(_launch(x.clone(), cos, sin, False, c), ref))
        tuning.store_config("rope", _key(nH, D, dtype), cfg)
        n_bytes = 2 * x.numel() * 2 + 2 * T * D * 4
        out.append(dict(shape=dict(kernel="rope", T=T, nH=nH, D=D, dtype="bf16"), config=cfg, ms=ms,
                        throughput=f"{n_bytes / ms / 1e6:.0f} GB/s"))
    return out
