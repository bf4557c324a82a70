"""kernels/moe_routing.py in Triton's interpreter vs the torch reference; the reference backward vs autograd.

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_moe_routing.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import moe_routing
from horizon_triton.kernels.moe_routing import (moe_permute_ref, moe_sigmoid_topk_backward_ref,
                                                moe_sigmoid_topk_forward_ref, moe_softmax_topk_backward_ref,
                                                moe_softmax_topk_forward_ref)

ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
SOFTMAX_CASES = [(37, 8, 1), (37, 8, 2), (37, 16, 4), (19, 64, 8), (19, 128, 8), (5, 100, 4)]
VARIANTS = [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)]
SIGMOID_CASES = [  # T, E, k, n_group, topk_group
    (37, 8, 2, 1, 1), (37, 16, 4, 4, 2), (19, 64, 8, 8, 4), (19, 128, 8, 8, 4), (5, 96, 6, 1, 1), (7, 20, 4, 5, 3)]


def _logits(T, E, dtype, dev):
    """Distinct values in every row, exact in bf16 (a tie's order is unspecified in torch.topk): a random
    permutation of E steps of a power of two, spanning about ±4."""
    perm = torch.randn(T, E, device=dev).argsort(-1)
    return ((perm - E // 2).float() * 2.0 ** -(E.bit_length() - 4)).to(dtype)


@pytest.mark.parametrize("renormalize, dtype", VARIANTS)
@pytest.mark.parametrize("T, E, k", SOFTMAX_CASES)
def test_softmax_topk_matches_reference(T, E, k, renormalize, dtype, dev):
    logits = _logits(T, E, dtype, dev)
    weights, ids = moe_routing.moe_softmax_topk_forward(logits, k, renormalize)
    w_ref, ids_ref = moe_softmax_topk_forward_ref(logits, k, renormalize)
    assert ids.dtype == torch.int32 and torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, w_ref, rtol=1e-6, atol=1e-7)        # both in fp32 from the same logits
    d_weights = torch.randn(T, k, device=dev)
    d_logits = moe_routing.moe_softmax_topk_backward(d_weights, logits, ids, renormalize)
    ref = moe_softmax_topk_backward_ref(d_weights, logits, ids, renormalize)
    ref32 = moe_softmax_topk_backward_ref(d_weights, logits.float(), ids, renormalize)
    assert_within_reference_error(d_logits, ref, ref32, ATOL[dtype] * (1 + ref32.abs().max().item()), "d_logits")


@pytest.mark.parametrize("renormalize, dtype", VARIANTS)
@pytest.mark.parametrize("T, E, k, n_group, topk_group", SIGMOID_CASES)
def test_sigmoid_topk_matches_reference(T, E, k, n_group, topk_group, renormalize, dtype, dev):
    logits = _logits(T, E, dtype, dev)
    bias = 0.3 * torch.randn(E, device=dev)
    args = (k, n_group, topk_group, renormalize, 2.5)
    weights, ids = moe_routing.moe_sigmoid_topk_forward(logits, bias, *args)
    w_ref, ids_ref = moe_sigmoid_topk_forward_ref(logits, bias, *args)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, w_ref, rtol=1e-6, atol=1e-7)
    d_weights = torch.randn(T, k, device=dev)
    d_logits = moe_routing.moe_sigmoid_topk_backward(d_weights, logits, ids, renormalize, 2.5)
    ref = moe_sigmoid_topk_backward_ref(d_weights, logits, ids, renormalize, 2.5)
    ref32 = moe_sigmoid_topk_backward_ref(d_weights, logits.float(), ids, renormalize, 2.5)
    assert_within_reference_error(d_logits, ref, ref32, ATOL[dtype] * (1 + ref32.abs().max().item()), "d_logits")


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_routing_backward_matches_autograd(renormalize, dev):
    """The hand-written routing backward against autograd through the forward's own weight formula (the choice of
    experts held fixed: it is piecewise constant)."""
    T, E, k = 37, 16, 4
    logits = _logits(T, E, torch.float32, dev).requires_grad_(True)
    d_weights = torch.randn(T, k, device=dev)
    _, ids = moe_softmax_topk_forward_ref(logits.detach(), k, renormalize)
    picked = torch.softmax(logits, -1).gather(1, ids.long())
    (picked / picked.sum(-1, keepdim=True) if renormalize else picked).backward(d_weights)
    torch.testing.assert_close(moe_softmax_topk_backward_ref(d_weights, logits.detach(), ids, renormalize),
                               logits.grad, rtol=1e-5, atol=1e-6)
    logits.grad = None
    bias = 0.3 * torch.randn(E, device=dev)
    _, ids = moe_sigmoid_topk_forward_ref(logits.detach(), bias, k, 4, 2, renormalize, 2.5)
    s = torch.sigmoid(logits).gather(1, ids.long())
    (2.5 * (s / (s.sum(-1, keepdim=True) + 1e-20) if renormalize else s)).backward(d_weights)
    torch.testing.assert_close(moe_sigmoid_topk_backward_ref(d_weights, logits.detach(), ids, renormalize, 2.5),
                               logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T, E, k", [(37, 8, 2), (101, 16, 4), (5, 128, 2), (300, 64, 8), (1, 8, 1)])
def test_permute_matches_reference(T, E, k, dev):
    """Stable counting sort over several blocks of slots (T·k up to 2400 > PERMUTE_BLOCK), experts with no token."""
    ids = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)]).to(torch.int32)
    ids[T // 2:, 0] = 3                                                   # one crowded expert
    order, offsets = moe_routing.moe_permute(ids, E)
    order_ref, offsets_ref = moe_permute_ref(ids, E)
    assert order.dtype == offsets.dtype == torch.int32
    assert torch.equal(order, order_ref) and torch.equal(offsets, offsets_ref)
    if T * k < E:
        assert (offsets[1:] == offsets[:-1]).any()


def test_reference_permute_sorts_by_expert(dev):
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]], dtype=torch.int32, device=dev)
    order, offsets = moe_permute_ref(ids, 4)
    assert order.tolist() == [1, 2, 3, 5, 0, 4] and offsets.tolist() == [0, 2, 4, 6, 6]


def test_clear_errors(dev):
    logits = torch.randn(4, 8, device=dev)
    with pytest.raises(ValueError, match="top_k=9"):
        moe_routing.moe_softmax_topk_forward(logits, 9, True)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        moe_routing.moe_softmax_topk_forward(logits[None], 2, True)
    with pytest.raises(TypeError, match="dtype"):
        moe_routing.moe_softmax_topk_forward(logits.double(), 2, True)
    with pytest.raises(ValueError, match="contiguous"):
        moe_routing.moe_softmax_topk_forward(torch.randn(8, 4, device=dev).t(), 2, True)
    with pytest.raises(ValueError, match="n_group=3"):
        moe_routing.moe_sigmoid_topk_forward(logits, torch.zeros(8, device=dev), 2, 3, 1, True, 1.0)
    with pytest.raises(ValueError, match="topk_group=1"):
        moe_routing.moe_sigmoid_topk_forward(logits, torch.zeros(8, device=dev), 4, 4, 1, True, 1.0)
    with pytest.raises(ValueError, match="bias"):
        moe_routing.moe_sigmoid_topk_forward(logits, torch.zeros(7, device=dev), 2, 1, 1, True, 1.0)
    _, ids = moe_routing.moe_softmax_topk_forward(logits, 2, True)
    with pytest.raises(TypeError, match="int32"):
        moe_routing.moe_softmax_topk_backward(torch.zeros(4, 2, device=dev), logits, ids.long(), True)
    with pytest.raises(ValueError, match="int32"):
        moe_routing.moe_permute(ids.long(), 8)


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    cands = [{"ROWS": 4, "num_warps": 4}, {"ROWS": 2, "num_warps": 4}]
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, moe_routing, "CANDIDATES", cands, dict(T=9, E=16, k=4),
                                    dev)
    names = ["moe_softmax_topk_fwd", "moe_sigmoid_topk_fwd", "moe_softmax_topk_bwd", "moe_sigmoid_topk_bwd"]
    assert [r["shape"]["kernel"] for r in rows] == names
    assert all(r["config"] == cands[-1] and r["throughput"].endswith("GB/s") for r in rows)
    assert all(stored[n]["E16"] == cands[-1] for n in names)


def _hopper_report() -> dict:
    """Every routing kernel compiled for sm_90 at the default rows per program for E = 128 and 256 (DeepSeek-V3's
    grouped routing: 8 groups, 4 kept, top-8), fp32 and bf16 logits; child process of
    test_kernels_compile_for_hopper."""
    from hopper_compile import compile_sm90
    report = {}
    for E in (128, 256):
        cfg = moe_routing._rows_config("", E)
        for dt in ("fp32", "bf16"):
            common = dict(ROWS=cfg["ROWS"], BLOCK_E=E)
            ptrs = lambda names, lowp: {n: (f"*{dt}" if n in lowp else "*i32" if "ids" in n else "*fp32")  # noqa: E731
                                        for n in names}
            shapes = {"T": "i32", "E": "i32", "stride_l_t": "i32"}
            types = {**ptrs(("logits_ptr", "weights_ptr", "ids_ptr"), ("logits_ptr",)), **shapes}
            report[f"softmax_fwd/E{E}/{dt}"] = compile_sm90(
                moe_routing._softmax_topk_fwd_kernel, types,
                dict(TOP_K=8, RENORMALIZE=True, BLOCK_K=8, **common), cfg["num_warps"], 1)
            types = {**ptrs(("logits_ptr", "bias_ptr", "weights_ptr", "ids_ptr"), ("logits_ptr",)), **shapes,
                     "scaling": "fp32"}
            report[f"sigmoid_fwd/E{E}/{dt}"] = compile_sm90(
                moe_routing._sigmoid_topk_fwd_kernel, types,
                dict(TOP_K=8, N_GROUP=8, TOPK_GROUP=4, RENORMALIZE=True, BLOCK_K=8, BLOCK_G=8, **common),
                cfg["num_warps"], 1)
            types = {**ptrs(("d_weights_ptr", "logits_ptr", "ids_ptr", "d_logits_ptr"), ("logits_ptr", "d_logits_ptr")),
                     **shapes, "stride_dl_t": "i32"}
            report[f"softmax_bwd/E{E}/{dt}"] = compile_sm90(
                moe_routing._softmax_topk_bwd_kernel, types, dict(TOP_K=8, RENORMALIZE=True, **common),
                cfg["num_warps"], 1)
            report[f"sigmoid_bwd/E{E}/{dt}"] = compile_sm90(
                moe_routing._sigmoid_topk_bwd_kernel, {**types, "scaling": "fp32"},
                dict(TOP_K=8, RENORMALIZE=True, **common), cfg["num_warps"], 1)
    report["histogram"] = compile_sm90(moe_routing._expert_histogram_kernel,
                                       {"ids_ptr": "*i32", "counts_ptr": "*i32", "S": "i32", "E": "i32"},
                                       dict(BLOCK_S=moe_routing.PERMUTE_BLOCK, BINS=512), 4, 1)
    report["scatter"] = compile_sm90(moe_routing._expert_scatter_kernel,
                                     {"ids_ptr": "*i32", "start_ptr": "*i32", "order_ptr": "*i32", "S": "i32",
                                      "n_blocks": "i32", "n_experts": "i32"},
                                     dict(BLOCK_S=moe_routing.PERMUTE_BLOCK), 4, 1)
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers every routing kernel for sm_90a without register spills, within an H100's
    shared memory (the interpreter never compiles them)."""
    hopper_compile.assert_fits_without_spills(hopper_compile.report("test_moe_routing", "_hopper_report"))
