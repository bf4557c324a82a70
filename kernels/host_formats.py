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
bits instead of a search: with r = |x| · (1/scale) (fp32),
    k = ((bits(r) + u) >> 20) - 8·(127 - E_top)        (E_top = 15 for exp_avg, 31 for exp_avg_sq)
where u in [0, 2^20) is a pseudo-random integer: r is rounded stochastically to one of its two neighbouring
codes, up with probability equal to its distance from the lower one, so the stored moment is unbiased. u is a
hash of (element index, step, moment, buffer seed), not a random generator's draw, so a step is reproducible and the C++
kernel and this reference agree bit for bit. The block maximum has r = 1 exactly and is stored exactly. Below
the smallest code: exp_avg rounds to the nearer of 0 and 2^-14; exp_avg_sq never rounds a positive value to 0
(it takes the smallest code): a zero second moment under a nonzero first one would make the update m/eps.
Decoding is a table lookup times the scale. Codes above 1.0 (7 per map) are never produced.

Why stochastic: rounding to nearest freezes a moment whose change per step is below half a code step (3-6%),
and β2 = 0.999 changes v by about 0.1% a step. On tests/test_master_precision.py's 120-step fine-tune, nearest
rounding ended 1.8% above the fp32-moment loss (m and v each about half of it), 4 exponent / 4 mantissa bit
variants 1.4%, stochastic rounding 0.2-0.4% (two data seeds). The offsets must be independent between elements
and buffers: a first hash of index·C + step·C' (neighbouring elements' offsets related across steps, every layer
the same) ended 1.9% above. The price is noise: an element's v wanders by a few code steps over 1/(1-β2) steps
(tests/test_cpu_adam.py bounds it), while its mean stays right.
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


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def rounding_offsets(index: torch.Tensor, step: int, salt: int, seed: int = 0) -> torch.Tensor:
    """u in [0, 2^20) for each element index (int64): mix(mix(index + seed·C) + (2·step + salt)·C') in uint32
    arithmetic. The index is mixed on its own first, so that the sequences of two neighbouring elements over
    the steps are unrelated; salt 0 is exp_avg, 1 exp_avg_sq; seed tells buffers apart (the layer index)."""
    x = _mix32((index + seed * 0x632BE5AB) & _MASK32)
    return _mix32((x + (2 * step + salt) * 0x9E3779B1) & _MASK32) >> 12


def quantize(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, signed: bool, step: int,
             first_index: int = 0, seed: int = 0) -> None:
    """Writes the codes (uint8[n]) and block maxima (fp32[num_blocks(n)]) of fp32 x in place. step, seed and
    the index of x's first element in its buffer (a multiple of QBLOCK) drive the stochastic rounding."""
    n = x.numel()
    blocks = _blocks(x)
    magnitude = blocks.abs()
    scale = magnitude.amax(dim=1)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    r = magnitude * inv[:, None]                 # fp32 multiply, the same rounding as the C++ kernel
    top = _M_TOP if signed else _V_TOP
    u = rounding_offsets(torch.arange(first_index, first_index + blocks.numel()), step, 0 if signed else 1, seed)
    k = ((r.view(torch.int32).long() + u.view(blocks.shape)) >> 20) - 8 * (127 - top)
    smallest = torch.full_like(k, 8)
    if signed:
        k = torch.where(k < 8, torch.where(r >= 2.0 ** -top, smallest, torch.zeros_like(k)), k)
        k = k.clamp(max=127) | ((blocks.view(torch.int32) >> 31) & 1).long() << 7
    else:
        k = torch.where(k < 8, torch.where(r > 0, smallest, torch.zeros_like(k)), k).clamp(max=255)
    codes.copy_(k.view(-1)[:n].to(torch.uint8))
    scales.copy_(scale)
