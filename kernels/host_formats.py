"""Number formats of the host store: the fp32 master split in two 16-bit halves, and 8-bit Adam moments.

Split master (bf16 compute mode). An fp32 value with bits u (uint32) is kept as
    hi = (u + 0x8000) >> 16        the bf16 working weight: u rounded to nearest on its top 16 bits
    lo = u - (hi << 16)            a signed 16-bit remainder in [-0x8000, 0x8000)
and (hi << 16) + lo (mod 2^32) gives u back exactly. Adding 0x8000 before truncating rounds to nearest with
exact ties (low half exactly 0x8000) rounded away from zero, not to even: on those ties alone hi differs from
``torch.float32 -> bfloat16`` (round-to-nearest-even). NaN masters may read as inf in hi; the master itself
(hi, lo) stays exact. Both halves are stored as 16-bit words: hi as torch.bfloat16 (what streams to the device),
lo as torch.int16.

Blockwise 8-bit moments (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"): each block of
QBLOCK consecutive elements stores one fp32 scale, the block's absolute maximum, and one byte per element,
a code of x / scale in a dynamic (floating-point) map:
    exp_avg     signed   sign, 4 exponent bits, 3 mantissa bits: ±2^(e-15)·(1 + f/8), e = 1..15; code 0 is 0
                          (2^-14 .. 1 of the block max at 3-6% relative step; below 2^-15 of it: 0)
    exp_avg_sq  unsigned 5 exponent bits, 3 mantissa bits: 2^(e-31)·(1 + f/8), e = 1..31; code 0 is 0
                          (2^-30 .. 1: v spans the square of the gradients' range)
A floating-point map rather than Dettmers' decimal tree map, so that encoding is integer arithmetic on the fp32
bits instead of a search: r = |x| · (1/scale) rounded to nearest on its top bits (ties away from zero), that is
    k = ((bits(r) + 2^19) >> 20) - 8·(127 - E_top)     (E_top = 15 for exp_avg, 31 for exp_avg_sq)
Below the smallest code: exp_avg rounds to 0 or 2^-14 (nearest); exp_avg_sq never rounds a positive value to 0
(it takes the smallest code): a zero second moment under a nonzero first one would make the update m/eps.
Decoding is a table lookup times the scale. Codes above 1.0 (7 per map) are never produced.

Each step re-encodes against the block's new maximum, which itself is stored exactly (r = 1), so the codes
follow a block that grows or shrinks as a whole; an element whose ratio to the maximum drifts by less than half
a code step a step (β2 = 0.999 changes v by ~0.1% a step) keeps its code until the drift adds up: the error
stays bounded by half a code step of that ratio, not zero (tests/test_cpu_adam.py measures 5-9% mean relative
error on m and v, 2% mean bias on v, after 30 steps). Stochastic rounding was tried and removed: unbiased, but
its noise accumulates in v over 1/(1-β2) steps (10% mean error already at 50 steps).
"""
from __future__ import annotations

import torch

QBLOCK = 256                      # elements per quantization block (one fp32 scale each)
_M_TOP, _V_TOP = 15, 31           # exponent code of 1.0 in each map


def _code_table(signed: bool) -> torch.Tensor:
    """fp32[256]: the value of each code for a scale of 1."""
    codes = torch.arange(256)
    magnitude = codes & 0x7F if signed else codes
    top = _M_TOP if signed else _V_TOP
    e, f = magnitude >> 3, magnitude & 7
    values = torch.ldexp(1 + f.double() / 8, (e - top).double()) * (e > 0)
    if signed:
        values = torch.where(codes >= 128, -values, values)
    return values.float()


EXP_AVG_CODES = _code_table(signed=True)
EXP_AVG_SQ_CODES = _code_table(signed=False)


def num_blocks(n: int) -> int:
    return (n + QBLOCK - 1) // QBLOCK


# ----------------------------------------------------------------------------------------------------------
# Split master
# ----------------------------------------------------------------------------------------------------------
def split_master(values: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> None:
    """Writes fp32 ``values`` into the halves hi (bf16) and lo (int16), same shape, in place."""
    u = values.contiguous().view(torch.int32)
    top = (u + 0x8000) >> 16                     # int32 arithmetic: the low 16 bits are the bf16 pattern
    hi.view(torch.int16).copy_(top.to(torch.int16))
    lo.copy_((u - (top << 16)).to(torch.int16))


def join_master(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The exact fp32 master from its halves (a new tensor)."""
    return ((hi.view(torch.int16).to(torch.int32) << 16) + lo.to(torch.int32)).view(torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Blockwise 8-bit moments
# ----------------------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[n] -> [num_blocks, QBLOCK], the tail padded with zeros (which change no block maximum)."""
    n = x.numel()
    padded = torch.zeros(num_blocks(n) * QBLOCK, dtype=x.dtype)
    padded[:n] = x
    return padded.view(-1, QBLOCK)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8[n] codes and fp32[num_blocks(n)] scales -> fp32[n]."""
    table = EXP_AVG_CODES if signed else EXP_AVG_SQ_CODES
    values = _blocks(table[codes.long()])        # [num_blocks, QBLOCK]
    return (values * scales[:, None]).view(-1)[:codes.numel()]


def quantize(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> None:
    """Writes the codes (uint8[n]) and block maxima (fp32[num_blocks(n)]) of fp32 x in place."""
    n = x.numel()
    blocks = _blocks(x)
    magnitude = blocks.abs()
    scale = magnitude.amax(dim=1)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    r = magnitude * inv[:, None]                 # fp32 multiply, the same rounding as the C++ kernel
    top = _M_TOP if signed else _V_TOP
    k = ((r.view(torch.int32) + (1 << 19)) >> 20) - 8 * (127 - top)
    smallest = torch.full_like(k, 8)
    if signed:
        k = torch.where(k < 8, torch.where(r >= 2.0 ** -top, smallest, torch.zeros_like(k)), k)
        k = k.clamp(max=127) | ((blocks.view(torch.int32) >> 31) & 1) << 7
    else:
        k = torch.where(k < 8, torch.where(r > 0, smallest, torch.zeros_like(k)), k).clamp(max=255)
    codes.copy_(k.view(-1)[:n].to(torch.uint8))
    scales.copy_(scale)
