"""The library path's MoE grouped GEMMs (kernels/library.py: torch._grouped_mm, one call for all experts) against
the references' per-expert loops, under the tests' tolerance rule: odd token counts, experts with no token, top-k
1/2/4, E 8..64, with and without biases, gpt-oss's transposed weights, LoRA's strided adapter views, frozen experts.

On CPU the grouped GEMMs compute in fp32 (as the references); on a GPU machine `TRITON_INTERPRET=0 pytest
tests/test_moe_library.py` runs the same checks in bf16 through CUDA's grouped GEMM (fp32 runs the reference
there), where each weight-gradient product is rounded to bf16 once before it is added."""
import pytest
import torch
from kernel_checks import CountHostReads, assert_within_reference_error

from horizon_triton.kernels import library, reference

H, I = 40, 36                      # multiples of 16 bytes in fp32 (the grouped GEMM's operand layout), of no tile
CASES = [  # T, E, k: odd token counts, experts with no token (T·k < E), top-k 1/2/4
    (37, 8, 1), (37, 16, 2), (19, 64, 4), (5, 32, 4)]


def _atol(dtype, dev, weight_grad: bool) -> float:
    if dtype == torch.float32:
        return 1e-5
    # CUDA's bf16 grouped GEMM writes the weight-gradient product in bf16: one rounding, 2^-9 relative
    return 2 ** -8 if weight_grad and dev.type == "cuda" else 1e-3


def _routing(T, E, k, dev):
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32).to(dev)
    return reference.moe_permute(ids, E)


def _check(name, op, args, dtype, dev, grads=()):
    """library.<op>, reference.<op> and reference.<op> on fp32 copies, each with its own copies of the (non-zero:
    accumulation is checked too) gradient buffers ``grads``; every output compared."""
    lift = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
    runs = []
    for fn, cast in ((getattr(library, op), lambda a: a), (getattr(reference, op), lambda a: a),
                     (getattr(reference, op), lift)):
        bufs = [None if g is None else g.clone() for g in grads]
        out = fn(*(cast(a) for a in args), *bufs)
        runs.append([*(out if isinstance(out, tuple) else (out,)), *(b for b in bufs if b is not None)])
    for i, (o, r, r32) in enumerate(zip(*runs)):
        atol = _atol(dtype, dev, weight_grad=i > 0) * (1 + r32.abs().max().item())
        assert_within_reference_error(o, r, r32, atol, f"{name}[{i}]")


def _weights(E, n, k, dtype, dev, transposed: bool):
    """[E, n, k] as the ops take it: contiguous, or gpt-oss's [E, k, n] parameter transposed (a view)."""
    if transposed:
        return (torch.randn(E, k, n, device=dev) * k ** -0.5).to(dtype).transpose(1, 2)
    return (torch.randn(E, n, k, device=dev) * k ** -0.5).to(dtype)


@pytest.mark.parametrize("layout", ["biases", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, E, k", CASES)
def test_grouped_gemms_match_reference(T, E, k, dtype, layout, dev):
    """Biases on contiguous weights (gpt-oss's biases), or no biases on transposed views (gpt-oss's weights; the
    other families' weights are the contiguous case)."""
    order, offsets = _routing(T, E, k, dev)
    rand = lambda *shape: torch.randn(*shape, device=dev).to(dtype)  # noqa: E731
    transposed = layout == "transposed"
    w_gu, w_d = _weights(E, 2 * I, H, dtype, dev, transposed), _weights(E, H, I, dtype, dev, transposed)
    b_gu, b_d = (None, None) if transposed else (rand(E, 2 * I), rand(E, H))
    x, h, d_gate_up, d_o = rand(T, H), rand(T * k, I), rand(T * k, 2 * I), rand(T * k, H)
    grad = lambda *shape: None if transposed and len(shape) == 2 else torch.randn(*shape, device=dev)  # noqa: E731
    _check("gate_up_fwd", "moe_gate_up_forward", (x, order, offsets, k, w_gu, b_gu), dtype, dev)
    _check("down_fwd", "moe_down_forward", (h, order, offsets, w_d, b_d), dtype, dev)
    _check("gate_up_bwd", "moe_gate_up_backward", (d_gate_up, x, order, offsets, k, w_gu), dtype, dev,
           grads=(grad(E, 2 * I, H), grad(E, 2 * I)))
    _check("down_bwd", "moe_down_backward", (d_o, h, order, offsets, w_d), dtype, dev,
           grads=(grad(E, H, I), grad(E, H)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_adapter_views_and_identity_order(dtype, dev):
    """What models/generic/experts.py passes for LoRA on experts: peft's A[r·E, in] as [E, r, in] and B[out, r·E]
    as [E, out, r] (strides (1, r·E, E): no unit stride among the last two axes), rows already in expert order
    (the identity order, top-k 1)."""
    T, E, k, r = 37, 8, 2, 8
    order, offsets = _routing(T, E, k, dev)
    rows = torch.arange(T * k, dtype=torch.int32, device=dev)
    A = torch.randn(r * E, H, device=dev).to(dtype).view(E, r, H)
    B = torch.randn(2 * I, r * E, device=dev).to(dtype).view(2 * I, r, E).permute(2, 0, 1)
    dB = torch.randn(2 * I, r * E, device=dev).view(2 * I, r, E).permute(2, 0, 1)
    x, xa, d_gu = (torch.randn(*s, device=dev).to(dtype) for s in ((T, H), (T * k, r), (T * k, 2 * I)))
    _check("A_fwd", "moe_gate_up_forward", (x, order, offsets, k, A), dtype, dev)
    _check("B_fwd", "moe_gate_up_forward", (xa, rows, offsets, 1, B), dtype, dev)
    _check("B_bwd", "moe_gate_up_backward", (d_gu, xa, rows, offsets, 1, B), dtype, dev, grads=(dB,))
    _check("B_down_bwd", "moe_down_backward", (d_gu, xa, rows, offsets, B), dtype, dev, grads=(dB,))


def test_frozen_experts_get_their_input_gradient_alone(dev):
    """d_weight None: no weight gradient is computed, the input gradient is the reference's."""
    T, E, k = 37, 16, 2
    order, offsets = _routing(T, E, k, dev)
    x, d_gu, w_gu = torch.randn(T, H, device=dev), torch.randn(T * k, 2 * I, device=dev), _weights(
        E, 2 * I, H, torch.float32, dev, False)
    torch.testing.assert_close(library.moe_gate_up_backward(d_gu, x, order, offsets, k, w_gu, None),
                               reference.moe_gate_up_backward(d_gu, x, order, offsets, k, w_gu, None))
    h, d_o, w_d = torch.randn(T * k, I, device=dev), torch.randn(T * k, H, device=dev), _weights(
        E, H, I, torch.float32, dev, False)
    torch.testing.assert_close(library.moe_down_backward(d_o, h, order, offsets, w_d, None),
                               reference.moe_down_backward(d_o, h, order, offsets, w_d, None))


def test_grouped_path_reads_nothing_on_the_host(monkeypatch, dev):
    """The grouped path never reads a device value on the host (the reference's per-expert loop syncs once for the
    row ranges); its weight gradient cut into chunks of the N axis sums to the same as in one piece."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32      # CUDA's grouped GEMM: bf16 only
    T, E, k = 37, 8, 2
    order, offsets = _routing(T, E, k, dev)
    x, d_gu, h = (torch.randn(*s, device=dev).to(dtype) for s in ((T, H), (T * k, 2 * I), (T * k, I)))
    w_gu, w_d = _weights(E, 2 * I, H, dtype, dev, False), _weights(E, H, I, dtype, dev, False)
    whole = torch.zeros(E, 2 * I, H, device=dev)
    library.moe_gate_up_backward(d_gu, x, order, offsets, k, w_gu, whole)
    monkeypatch.setattr(library, "GROUPED_DW_CHUNK_ELEMENTS", E * H * 8)     # 8 rows of N per product: 9 chunks
    chunked, d_bias = torch.zeros(E, 2 * I, H, device=dev), torch.zeros(E, 2 * I, device=dev)
    with CountHostReads() as mode:
        library.moe_gate_up_forward(x, order, offsets, k, w_gu)
        library.moe_gate_up_backward(d_gu, x, order, offsets, k, w_gu, chunked, d_bias)
        library.moe_down_forward(h, order, offsets, w_d)
    assert mode.reads == [], mode.reads
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_unaligned_weight_takes_the_reference(dev):
    """A weight dimension that is no multiple of 16 bytes (here 38 fp32 values) is outside the grouped GEMM's
    operand layout: the reference computes it, with its one host read (the row ranges)."""
    T, E, k, n = 19, 8, 2, 38
    order, offsets = _routing(T, E, k, dev)
    x, w = torch.randn(T, H, device=dev), _weights(E, n, H, torch.float32, dev, False)
    with CountHostReads() as mode:
        out = library.moe_gate_up_forward(x, order, offsets, k, w)
    assert mode.reads == ["tolist"], mode.reads
    torch.testing.assert_close(out, reference.moe_gate_up_forward(x, order, offsets, k, w))
