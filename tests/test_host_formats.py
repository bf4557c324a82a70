"""kernels/host_formats.py against independent references: numpy uint32 arithmetic for the split master, a
brute-force nearest-code search for the 8-bit maps."""
import numpy as np
import pytest
import torch

from horizon_triton.kernels.host_formats import (EXP_AVG_CODES, EXP_AVG_SQ_CODES, QBLOCK, dequantize, join_master,
                                                 num_blocks, quantize, split_master)

SPECIAL_BITS = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0x00008000, 0x00000001, 0x80000000,
                0x00000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0xFF7F8000, 0x7FC00000, 0x007F8000]


def _bit_patterns(n=200_000):
    randoms = np.random.default_rng(0).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([np.array(SPECIAL_BITS, dtype=np.uint32), randoms])


def _split(bits: np.ndarray):
    values = torch.from_numpy(bits.view(np.float32).copy())
    hi, lo = torch.empty(len(bits), dtype=torch.bfloat16), torch.empty(len(bits), dtype=torch.int16)
    split_master(values, hi, lo)
    return values, hi, lo


def test_split_master_is_exact_for_every_bit_pattern():
    bits = _bit_patterns()
    values, hi, lo = _split(bits)
    assert torch.equal(join_master(hi, lo).view(torch.int32), values.view(torch.int32))   # NaNs included


def test_high_half_is_round_to_nearest_ties_away_from_zero():
    """hi = (u + 0x8000) >> 16 in uint32 arithmetic (numpy), and off RNE (torch's cast) only on exact ties."""
    bits = _bit_patterns()
    values, hi, lo = _split(bits)
    expected = ((bits.astype(np.uint64) + 0x8000) >> 16).astype(np.uint16)
    assert np.array_equal(hi.view(torch.int16).numpy().view(np.uint16), expected)
    remainder = (bits.astype(np.int64) - (expected.astype(np.int64) << 16)) % 2**32
    remainder = np.where(remainder >= 2**31, remainder - 2**32, remainder)      # as a signed 32-bit value
    assert remainder.min() >= -0x8000 and remainder.max() < 0x8000
    assert np.array_equal(lo.numpy().astype(np.int64), remainder)
    finite = ~values.isnan()
    tie = (bits & 0xFFFF) == 0x8000
    rne = values.to(torch.bfloat16).view(torch.int16)
    same = hi.view(torch.int16) == rne
    assert same[finite & ~torch.from_numpy(tie)].all()
    # ties: away from zero, so the magnitude is the larger neighbour (RNE picks the even one)
    ties = finite & torch.from_numpy(tie)
    assert (hi[ties].float().abs() >= values[ties].abs()).all()


def _neighbours(r: torch.Tensor, table: torch.Tensor):
    """Brute force over the usable codes (0 .. 1): the largest code value ≤ r and the smallest ≥ r."""
    usable = table[(table >= 0) & (table <= 1)].double()
    below = torch.where(usable[None, :] <= r[:, None].double(), usable[None, :], -1.0).amax(dim=1)
    above = torch.where(usable[None, :] >= r[:, None].double(), usable[None, :], 2.0).amin(dim=1)
    return below, above


@pytest.mark.parametrize("signed", [True, False])
def test_codes_are_a_neighbour_and_unbiased(signed):
    """Every code is one of the two map values around |x| / block max (up to the documented rules below the
    smallest code), its sign is x's, each block's scale is its max, the max itself is exact, and over many
    steps (different rounding offsets) the decoded values average to x."""
    g = torch.Generator().manual_seed(1)
    n = 2 * QBLOCK + 17                                  # a partial last block
    x = torch.randn(n, generator=g) * torch.logspace(-12, 0, n)[torch.randperm(n, generator=g)]
    if not signed:
        x = x * x
    x[3] = 0.0
    table = (EXP_AVG_CODES[:128] if signed else EXP_AVG_SQ_CODES)
    codes, scales = torch.empty(n, dtype=torch.uint8), torch.empty(num_blocks(n))
    mean = torch.zeros(n, dtype=torch.float64)
    steps = 200
    for step in range(1, steps + 1):
        quantize(x, codes, scales, signed, step=step)
        blocks = torch.nn.functional.pad(x, (0, num_blocks(n) * QBLOCK - n)).view(-1, QBLOCK)
        assert torch.equal(scales, blocks.abs().amax(dim=1))
        per_element_scale = scales.repeat_interleave(QBLOCK)[:n]
        r = x.abs() / per_element_scale
        value = EXP_AVG_CODES[codes.long()].abs() if signed else EXP_AVG_SQ_CODES[codes.long()]
        below, above = _neighbours(r, table)
        # the judge's r is |x| / scale in fp64, ours |x| * (1 / scale) in fp32: allow that rounding
        slack = 1e-6 * r.double()
        inside = (value.double() >= below - slack) & (value.double() <= above + slack)
        smallest = table[8].item()
        if signed:       # below the smallest code: the nearer of 0 and the smallest
            inside |= (r < smallest) & (value == torch.where(r >= smallest / 2, smallest, 0.0))
        else:            # a positive v takes at least the smallest code, never 0
            inside |= (r > 0) & (r < smallest) & (value == smallest)
        assert inside.all(), (x[~inside][:5], codes[~inside][:5])
        if signed:
            assert torch.equal((codes >= 128) & (codes != 128), (x < 0) & (codes != 128) & (codes != 0))
        else:
            assert ((codes == 0) == (x == 0)).all()      # a positive v never decodes to 0
        mean += dequantize(codes, scales, signed).double()
        assert torch.equal(dequantize(codes, scales, signed)[x.abs() == per_element_scale],
                           x[x.abs() == per_element_scale])                   # the block max is exact
    mean /= steps
    in_range = x.abs() >= 2.0 ** -13 * scales.repeat_interleave(QBLOCK)[:n]
    # unbiased: the mean of 200 draws is within 4 standard errors of x (a draw is off by < one code step,
    # 12.5% relative)
    assert ((mean - x.double()).abs()[in_range] <= 4 * 0.125 / steps ** 0.5 * x.abs()[in_range].double()).all()


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_below_one_code_step(signed):
    """In range (above 2^-14 of the block max), a decoded value is off by less than one code step: 2^-3
    relative (stochastic rounding picks either neighbour)."""
    g = torch.Generator().manual_seed(2)
    n = 4096
    x = torch.randn(n, generator=g) * torch.logspace(-3, 0, n)
    if not signed:
        x = x.abs()
    codes, scales = torch.empty(n, dtype=torch.uint8), torch.empty(num_blocks(n))
    quantize(x, codes, scales, signed, step=1)
    y = dequantize(codes, scales, signed)
    in_range = x.abs() >= 2.0 ** -14 * scales.repeat_interleave(QBLOCK)
    assert ((y - x).abs() / x.abs())[in_range].max() < 2.0 ** -3


def test_zero_block():
    codes, scales = torch.full((QBLOCK,), 7, dtype=torch.uint8), torch.ones(1)
    quantize(torch.zeros(QBLOCK), codes, scales, signed=True, step=1)
    assert not codes.any() and scales.item() == 0
    assert not dequantize(codes, scales, signed=True).any()
