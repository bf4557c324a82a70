"""The library path (kernels/library.py) on CPU: its segment layout, window arguments and layouts run through
aten's CPU flash attention (the same calling code as the CUDA flash call; the engine's CPU attention) against
reference.attention_*, and its cross-entropy against the reference under the tests' tolerance rule."""
import pytest
import torch
from kernel_checks import CountHostReads, assert_within_reference_error

from horizon_triton.data.batch import doc_ids_of
from horizon_triton.kernels import library, reference


def _doc_ids(rows: list[list[int]]) -> torch.Tensor:
    """Doc ids from each row's document lengths."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).int()


def _padded_doc_ids() -> torch.Tensor:
    """What the engine builds for a left-padded row and a right-padded row of two packed documents: every
    masked token a document of its own, numbered after the real ones (so the ids fall along the first row)."""
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[0, :3] = False
    keep[1, 12:] = False
    pos = torch.stack((torch.arange(16), torch.cat((torch.arange(5), torch.arange(11)))))
    return doc_ids_of(pos, keep)


def test_varlen_layout_cuts_at_rows_and_documents():
    cu, longest = library.varlen_layout(None, 3, 8, "cpu")
    assert cu.tolist() == [0, 8, 16, 24] and longest == 8 and cu.dtype == torch.int32
    docs = _doc_ids([[3, 5], [8], [2, 2, 4]])
    cu, longest = library.varlen_layout(docs, 3, 8, "cpu")
    assert cu.tolist() == [0, 3, 8, 16, 18, 20, 24] and longest == 8
    assert library.varlen_layout(docs, 3, 8, "cpu")[0] is cu                 # one sync per doc_ids tensor
    cu, longest = library.varlen_layout(_padded_doc_ids(), 2, 16, "cpu")     # each masked token a segment
    assert cu.tolist() == [0, 1, 2, 3, 16, 21, 28, 29, 30, 31, 32] and longest == 13


def test_document_cut_by_a_masked_token_takes_the_reference():
    """[1, 1, 0, 1] as attention_mask: the row's one document is cut by the masked token, and its two pieces still
    see each other; no segment layout says that, so the layout is None and the reference's result comes back."""
    docs = doc_ids_of(torch.arange(4)[None], torch.tensor([[True, True, False, True]]))
    assert docs.tolist() == [[0, 0, 6, 0]] and library.varlen_layout(docs, 1, 4, "cpu") is None
    q, k, v, do = (torch.randn(1, 4, h, 8) for h in (2, 1, 1, 2))
    o, lse = library.attention_forward(q, k, v, docs, 0.3)
    want = reference.attention_forward(q, k, v, docs, 0.3)
    assert torch.equal(o, want[0]) and torch.equal(lse, want[1])
    grads = library.attention_backward(do, q, k, v, o, lse, docs, 0.3)
    for g, w in zip(grads, reference.attention_backward(do, q, k, v, o, lse, docs, 0.3)):
        assert torch.equal(g, w)


def test_varlen_layout_reads_the_device_once():
    """On CUDA every host read of a device value is a sync: the layout of a packed micro-batch is worked out from
    one host copy of doc_ids (the torch calls that would read the device are counted; the rest is numpy)."""
    docs = _doc_ids([[3, 5], [8], [2, 2, 4]])
    with CountHostReads() as mode:
        cu, longest = library.varlen_layout(docs, 3, 8, "cpu")
    assert mode.reads[0] == "cpu" and mode.reads.count("cpu") + mode.reads.count("to") <= 2, mode.reads
    assert not set(mode.reads) - {"cpu", "to"}, mode.reads           # "to": cu's upload, not a read
    assert cu.tolist() == [0, 3, 8, 16, 18, 20, 24] and longest == 8


def test_window_argument_is_mistral_semantics():
    """i − j < W  ⇔  j ≥ i − (W − 1): FlashAttention's window_size_left is W − 1; a window ≥ S is no window.
    On CPU the window is an additive mask on top of the causal call."""
    assert library.window_left(100, 4) == 3
    assert library.window_left(100, None) is None and library.window_left(100, 100) is None
    allowed = (library._window_mask(10, library.window_left(10, 4), torch.float32) == 0).tril()    # and causal
    assert torch.equal(allowed, reference.attention_mask(10, None, 4, "cpu", 1)[0])
    assert library._window_mask(4, library.window_left(10, 4), torch.float32) is None     # the segment is shorter


CASES = {"causal": ([[16], [16]], None), "docs": ([[5, 11], [16]], None), "window": ([[16], [16]], 4),
         "docs+window": ([[7, 9], [3, 3, 10]], 5), "padded": (None, None), "padded+window": (None, 4)}


def _case_doc_ids(case: str) -> torch.Tensor | None:
    rows, _ = CASES[case]
    if case.startswith("padded"):
        return _padded_doc_ids()
    return None if case in ("causal", "window") else _doc_ids(rows)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_through_the_varlen_call_matches_reference(case, dtype):
    _, window = CASES[case]
    B, S, Hq, Hkv, D = 2, 16, 4, 2, 16
    docs = _case_doc_ids(case)
    q32, k32, v32, do32 = (torch.randn(B, S, h, D) for h in (Hq, Hkv, Hkv, Hq))
    q, k, v, do = (t.to(dtype) for t in (q32, k32, v32, do32))
    o, lse = library.attention_forward(q, k, v, docs, 0.3, window)
    o32, lse32 = reference.attention_forward(q32, k32, v32, docs, 0.3, window)
    o_lp, _ = reference.attention_forward(q, k, v, docs, 0.3, window)
    atol = {torch.float32: 2e-5, torch.bfloat16: 2e-3}[dtype]
    assert_within_reference_error(o, o_lp, o32, atol, "o")
    torch.testing.assert_close(lse, lse32, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    grads = library.attention_backward(do, q, k, v, o, lse, docs, 0.3, window)
    grads32 = reference.attention_backward(do32, q32, k32, v32, o32, lse32, docs, 0.3, window)
    grads_lp = reference.attention_backward(do, q, k, v, o_lp, lse, docs, 0.3, window)
    for name, g, g_lp, g32 in zip(("dq", "dk", "dv"), grads, grads_lp, grads32):
        assert g.shape == g32.shape and g.dtype == dtype
        assert_within_reference_error(g, g_lp, g32, atol * (1 + g32.abs().max().item()), name)


def test_lse_layout_round_trip():
    lse = torch.randn(2, 3, 5)
    varlen = library._lse_to_varlen(lse)
    assert varlen.shape == (3, 10) and torch.equal(varlen[1, 5:], lse[1, 1])
    assert torch.equal(library._lse_to_reference(varlen, 2, 5), lse)


@pytest.mark.parametrize("T,chunk", [(37, 16), (50, 4096)])
def test_cross_entropy_with_bf16_gradient_matches_reference(T, chunk):
    H, V = 32, 75
    h32, w32 = torch.randn(T, H), torch.randn(V, H) / H ** 0.5
    targets = torch.randint(0, V, (T,))
    targets[::5] = reference.IGNORE_INDEX
    h, w = h32.bfloat16(), w32.bfloat16()
    out = [torch.zeros(V, H)]
    out[1:] = library.linear_cross_entropy(h, w, targets, out[0], 1 / T, chunk)
    exact = [torch.zeros(V, H)]
    exact[1:] = reference.linear_cross_entropy(h32, w32, targets, exact[0], 1 / T, chunk)
    lowp = [torch.zeros(V, H)]
    lowp[1:] = reference.linear_cross_entropy(h, w, targets, lowp[0], 1 / T, chunk)
    for name, o, lp, ref in zip(("dW", "loss", "dh"), out, lowp, exact):
        assert_within_reference_error(o, lp, ref, 2e-3 * (1 + ref.abs().max().item()), name)


def _chunked_head_gradients(ops, h, w, targets, rows: int, token_chunk: int):
    """(dW, dh) of the two-pass head over lm_head chunks of ``rows``: pass 1 by the reference, pass 2 by ops."""
    (T, H), V = h.shape, w.shape[0]
    stats = [torch.full((T,), float("-inf")), torch.zeros(T), torch.zeros(T)]
    for a in range(0, V, rows):
        reference.cross_entropy_chunk_stats_(h, w[a:a + rows], targets, a, *stats, token_chunk=token_chunk)
    _, lse = reference.cross_entropy_chunk_loss(*stats, targets)
    dw, dh = torch.zeros(V, H), torch.zeros(T, H)
    for a in range(0, V, rows):
        ops.cross_entropy_chunk_backward(h, w[a:a + rows], targets, a, lse, 1 / T, dh, dw[a:a + rows],
                                         token_chunk=token_chunk)
    return dw, dh


@pytest.mark.parametrize("T,rows,token_chunk", [(37, 16, 8), (50, 75, 4096)])
def test_chunked_head_backward_with_bf16_gradient_matches_reference(T, rows, token_chunk):
    H, V = 32, 75
    h32, w32 = torch.randn(T, H), torch.randn(V, H) / H ** 0.5
    targets = torch.randint(0, V, (T,))
    targets[::5] = reference.IGNORE_INDEX
    h, w = h32.bfloat16(), w32.bfloat16()
    out = _chunked_head_gradients(library, h, w, targets, rows, token_chunk)
    exact = _chunked_head_gradients(reference, h32, w32, targets, rows, token_chunk)
    lowp = _chunked_head_gradients(reference, h, w, targets, rows, token_chunk)
    for name, o, lp, ref in zip(("dW", "dh"), out, lowp, exact):
        assert_within_reference_error(o, lp, ref, 2e-3 * (1 + ref.abs().max().item()), name)


def test_chunked_head_backward_runs_bf16_gemms():
    """g_c in bf16: both GEMMs of pass 2 take bf16 operands (the reference's fp32 g_c made them fp32 GEMMs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from horizon_triton.planning.dryrun import meta_addmm_dtype_out

    class Gemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            packet = func.overloadpacket
            if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.dtypes.append((args[0] if packet is torch.ops.aten.mm else args[1]).dtype)
            if func is torch.ops.aten.addmm.dtype_out:
                return meta_addmm_dtype_out(*args, **kwargs)     # torch 2.11's meta kernel raises (as in the dry run)
            return func(*args, **(kwargs or {}))

    h, w = torch.randn(8, 16).bfloat16(), torch.randn(10, 16).bfloat16()
    dh, dw = torch.zeros(8, 16, device="meta"), torch.zeros(10, 16, device="meta")
    meta = [t.to("meta") for t in (h, w, torch.randint(0, 10, (8,)), torch.zeros(8))]
    with Gemms() as seen:        # on the meta device matmul_accumulate_ takes its CUDA path
        library.cross_entropy_chunk_backward(meta[0], meta[1], meta[2], 0, meta[3], 0.1, dh, dw)
    assert seen.dtypes == [torch.bfloat16] * 3, seen.dtypes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash kernels need a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_flash_attention_matches_reference(case):
    _, window = CASES[case]
    B, S, Hq, Hkv, D = 2, 16, 8, 2, 128
    docs = _case_doc_ids(case)
    docs = None if docs is None else docs.cuda()
    q32, k32, v32, do32 = (torch.randn(B, S, h, D, device="cuda") for h in (Hq, Hkv, Hkv, Hq))
    q, k, v, do = (t.bfloat16() for t in (q32, k32, v32, do32))
    o, lse = library.attention_forward(q, k, v, docs, D ** -0.5, window)
    o32, lse32 = reference.attention_forward(q32, k32, v32, docs, D ** -0.5, window)
    o_lp, _ = reference.attention_forward(q, k, v, docs, D ** -0.5, window)
    assert_within_reference_error(o, o_lp, o32, 2e-3, "o")
    torch.testing.assert_close(lse, lse32, rtol=1e-2, atol=1e-2)
    grads = library.attention_backward(do, q, k, v, o, lse, docs, D ** -0.5, window)
    grads32 = reference.attention_backward(do32, q32, k32, v32, o32, lse32, docs, D ** -0.5, window)
    grads_lp = reference.attention_backward(do, q, k, v, o_lp, lse, docs, D ** -0.5, window)
    for name, g, g_lp, g32 in zip(("dq", "dk", "dv"), grads, grads_lp, grads32):
        assert_within_reference_error(g, g_lp, g32, 2e-3 * (1 + g32.abs().max().item()), name)
