"""Flash attention (kernels/attention.py) in the Triton interpreter against the torch reference, and the reference
itself against independent judges: torch.autograd for its hand-written backward, SDPA for its forward.

Tolerances follow the reference's own error: with o32 the fp32 reference and o_lp the reference computed the
plain-PyTorch way in the input dtype, the kernel passes when |o − o32| ≤ 2·|o_lp − o32| + atol (same for dq, dk,
dv, with autograd through the low-precision reference).

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_attention.py` runs the same checks on compiled kernels.
Without one, test_defaults_compile_for_hopper_without_spills and test_autotune_candidates_compile_for_hopper still
build the kernels for sm_90a (the interpreter runs them as Python and would accept code the compiler rejects)."""
import json
import math

import hopper_compile
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest  # noqa: F401  (autouse fixture)

from horizon_triton.kernels import attention as A
from horizon_triton.kernels import tuning

# the floor under 2·err_reference: fp32 references differ from the kernel only by summation order
ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}


def _doc_ids(B: int, S: int, starts: list[int]) -> torch.Tensor:
    """Doc ids from restarting position ids (what a packed batch carries): positions restart at 0 at each start."""
    pos = torch.arange(S).repeat(B, 1)
    for s in starts:
        pos[:, s:] -= pos[:, s:s + 1].clone()
    return ((pos == 0).cumsum(1) - 1).to(torch.int32)


def _inputs(B, S, Hq, Hkv, D, dtype, device="cpu"):
    return tuple(torch.randn(B, S, h, D).to(device, dtype) for h in (Hq, Hkv, Hkv))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v), (q, k, v), do)


# ----------------------------------------------------------------------------------------------------------
# The reference against independent judges
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("starts,window", [(None, None), ([11, 30], None), (None, 5), ([3, 20], 7)])
def test_reference_backward_matches_autograd(starts, window):
    B, S, Hq, Hkv, D = 2, 37, 4, 2, 16
    q, k, v = _inputs(B, S, Hq, Hkv, D, torch.float64)
    doc = _doc_ids(B, S, starts) if starts else None
    scale = D ** -0.5
    do = torch.randn(B, S, Hq, D, dtype=torch.float64)
    want = _grads(lambda q, k, v: A.attention_ref(q, k, v, doc, scale, window), q, k, v, do)
    qf, kf, vf, dof = (t.float() for t in (q, k, v, do))
    o, lse = A.attention_forward_ref(qf, kf, vf, doc, scale, window)
    got = A.attention_backward_ref(dof, qf, kf, vf, o, lse, doc, scale, window)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert _err(g, w) < 1e-5, name


@pytest.mark.parametrize("starts,window", [(None, None), ([11, 30], 6)])
def test_reference_forward_matches_sdpa(starts, window):
    B, S, Hq, Hkv, D = 2, 37, 4, 2, 16
    q, k, v = _inputs(B, S, Hq, Hkv, D, torch.float32)
    doc = _doc_ids(B, S, starts) if starts else None
    o, lse = A.attention_forward_ref(q, k, v, doc, 0.3, window)
    mask = A.attention_mask(S, doc, window, q.device, B)[:, None]                    # [B, 1, S, S]
    t = lambda x: x.transpose(1, 2).repeat_interleave(Hq // x.shape[2], dim=1)      # [B, Hq, S, D]
    want = F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, scale=0.3).transpose(1, 2)
    assert _err(o, want) < 1e-5
    scores = (t(q) @ t(k).transpose(-1, -2) * 0.3).masked_fill(~mask, -math.inf)
    assert _err(lse, torch.logsumexp(scores, -1)) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Kernels against the reference
# ----------------------------------------------------------------------------------------------------------
CASES = {                     # B, S, Hq, Hkv, D, doc starts, window
    "odd-S":            (1, 37, 2, 1, 64, None, None),
    "gqa-docs":         (2, 100, 4, 2, 64, [9, 50, 51], None),
    "mha-window":       (1, 100, 4, 4, 64, None, 20),
    "docs-window":      (2, 128, 4, 2, 64, [40, 90], 7),
    "hd128":            (1, 64, 2, 1, 128, None, None),
    "hd128-docs-window": (1, 100, 2, 2, 128, [33], 45),
    "long-docs-window": (1, 300, 2, 1, 64, [100, 260], 150),   # S > 256: the interpreter's 64×64 tiles
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, dev):
    _check_against_reference(case, dtype, dev)


def test_fp16_and_window_wider_than_sequence(dev):
    """fp16 is accepted too; a window ≥ S is the plain causal mask (the launcher drops it)."""
    B, S, Hq, Hkv, D, _, _ = CASES["odd-S"]
    _check_against_reference("odd-S", torch.float16, dev)
    q, k, v = _inputs(B, S, Hq, Hkv, D, torch.float32, dev)
    assert torch.equal(A.attention_forward(q, k, v, None, 0.1, S)[0], A.attention_forward(q, k, v, None, 0.1)[0])


def _case(case, dtype, dev):
    """The inputs of a CASES entry: q, k, v, dO (in dtype), doc ids, scale, window."""
    B, S, Hq, Hkv, D, starts, window = CASES[case]
    q, k, v = _inputs(B, S, Hq, Hkv, D, dtype, dev)
    doc = _doc_ids(B, S, starts).to(dev) if starts else None
    do = torch.randn(B, S, Hq, D).to(dev, dtype)
    return q, k, v, do, doc, D ** -0.5, window


def _check_output(o, lse, q, k, v, doc, scale, window, label):
    """o within the reference's own error, lse close to the reference's."""
    ref = lambda up: A.attention_ref(q, k, v, doc, scale, window, upcast=up)
    assert_within_reference_error(o, ref(False), ref(True), ATOL[q.dtype], f"{label} o")
    _, lse_ref = A.attention_forward_ref(q, k, v, doc, scale, window)
    assert _err(lse, lse_ref) < 1e-4


def _check_grads(grads, q, k, v, do, doc, scale, window, label):
    """dq, dk, dv within the reference's own error (autograd through the fp32 and the low-precision reference)."""
    ref = lambda up: (lambda q, k, v: A.attention_ref(q, k, v, doc, scale, window, upcast=up))
    g32 = _grads(ref(True), q.float(), k.float(), v.float(), do.float())
    g_lp = _grads(ref(False), q, k, v, do)
    for name, g, w, w_lp in zip(("dq", "dk", "dv"), grads, g32, g_lp):
        assert_within_reference_error(g, w_lp, w, ATOL[q.dtype], f"{label} {name}")


def _check_against_reference(case, dtype, dev):
    q, k, v, do, doc, scale, window = _case(case, dtype, dev)
    o, lse = A.attention_forward(q, k, v, doc, scale, window)
    _check_output(o, lse, q, k, v, doc, scale, window, case)
    _check_grads(A.attention_backward(do, q, k, v, o, lse, doc, scale, window), q, k, v, do, doc, scale, window,
                 case)


@pytest.mark.parametrize("S,window", [(1, None), (2, 1), (17, 1), (17, 3)])
def test_tiny_sequences_and_windows(S, window, dev):
    """One token, and windows of one token (a token sees only itself) or a few."""
    q, k, v = _inputs(1, S, 2, 1, 32, torch.float32, dev)
    do = torch.randn_like(q)
    doc = torch.zeros(1, S, dtype=torch.int32, device=dev)
    o, lse = A.attention_forward(q, k, v, doc, 0.2, window)
    o_ref, lse_ref = A.attention_forward_ref(q, k, v, doc, 0.2, window)
    assert _err(o, o_ref) < 1e-5 and _err(lse, lse_ref) < 1e-5
    for g, w in zip(A.attention_backward(do, q, k, v, o, lse, doc, 0.2, window),
                    A.attention_backward_ref(do, q, k, v, o_ref, lse_ref, doc, 0.2, window)):
        assert _err(g, w) < 1e-5


def test_backward_is_deterministic(dev):
    """The default (split) backward has no atomics: dK/dV are summed over the GROUP heads inside one program, so
    reruns are bitwise equal (meaningful on a GPU, where atomics would reorder the sums; the fused backward's dQ
    atomics are why it is only an autotune choice)."""
    B, S, Hq, Hkv, D = 1, 64, 4, 2, 32
    q, k, v = _inputs(B, S, Hq, Hkv, D, torch.bfloat16, dev)
    doc = _doc_ids(B, S, [20]).to(dev)
    do = torch.randn_like(q)
    o, lse = A.attention_forward(q, k, v, doc, 0.125)
    first = A.attention_backward(do, q, k, v, o, lse, doc, 0.125)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, A.attention_backward(do, q, k, v, o, lse, doc, 0.125)))


@pytest.mark.parametrize("D", [32, 96, 256])
def test_other_head_dims(D, dev):
    B, S, Hq, Hkv = 1, 40, 2, 1
    q, k, v = _inputs(B, S, Hq, Hkv, D, torch.bfloat16, dev)
    o, lse = A.attention_forward(q, k, v, None, D ** -0.5)
    o_ref, lse_ref = A.attention_forward_ref(q, k, v, None, D ** -0.5)
    assert _err(o, o_ref) <= 2e-2 and _err(lse, lse_ref) < 1e-4
    do = torch.randn_like(q)
    for g, w in zip(A.attention_backward(do, q, k, v, o_ref, lse_ref, None, D ** -0.5),
                    A.attention_backward_ref(do, q, k, v, o_ref, lse_ref, None, D ** -0.5)):
        assert _err(g, w) <= 4e-2 * max(1.0, w.float().abs().max().item())


def test_strided_views(dev):
    """q, k, v as head slices of one fused qkv projection (non-contiguous), doc_ids a non-contiguous view."""
    B, S, Hq, Hkv, D = 1, 50, 4, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, device=dev)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    doc = _doc_ids(B, 2 * S, [20]).to(dev)[:, ::2]
    do = torch.randn(B, S, Hq, D, device=dev).transpose(1, 2).contiguous().transpose(1, 2)   # head-major memory
    o, lse = A.attention_forward(q, k, v, doc, 0.125)
    o_ref, lse_ref = A.attention_forward_ref(q, k, v, doc, 0.125)
    assert _err(o, o_ref) < 1e-5
    for g, w in zip(A.attention_backward(do, q, k, v, o, lse, doc, 0.125),
                    A.attention_backward_ref(do, q, k, v, o_ref, lse_ref, doc, 0.125)):
        assert _err(g, w) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# TMA tiles (the kernels' TMA=True): Q/K/V/O and dO/dQ/dK/dV through tensor descriptors, which the interpreter runs
# (as masked pointer loads and stores bounded by the descriptor's shape). Small tiles as the pointer loads'
# interpreter ones.
# ----------------------------------------------------------------------------------------------------------
def _tma_forward(q, k, v, doc, scale, window):
    S = q.shape[1]
    cfg = A._tma_cfg(32, 16, 4, 1) if S <= A._INTERPRETER_LONG_S else A._tma_cfg(64, 64, 4, 1)
    assert A.tma_unsupported(q, k, v) is None
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[0], q.shape[2], S, device=q.device)
    A._launch_fwd(q, k, v, doc, o, lse, scale, A._window(S, window), cfg)
    return o, lse


def _tma_backward(do, q, k, v, o, lse, doc, scale, window):
    S = q.shape[1]
    short = S <= A._INTERPRETER_LONG_S
    cfg_dkdv = A._tma_cfg(16, 32, 4, 1) if short else A._tma_cfg(64, 64, 4, 1)
    cfg_dq = A._tma_cfg(32, 16, 4, 1) if short else A._tma_cfg(64, 64, 4, 1)
    assert A.tma_unsupported(q, k, v, do) is None
    return A._launch_bwd(do, q, k, v, o, lse, doc, scale, A._window(S, window), cfg_dkdv, cfg_dq)


def _recording_launches(monkeypatch) -> list:
    """Records (kernel name, its TMA argument) of every kernel launch from here on (None: no such argument)."""
    launched = []
    jit_class, launch = type(A._attn_fwd), type(A._attn_fwd).__getitem__

    def recording(self, grid):
        run = launch(self, grid)
        return lambda *args, **kw: (launched.append((self.__name__, kw.get("TMA"))), run(*args, **kw))[1]
    monkeypatch.setattr(jit_class, "__getitem__", recording)
    return launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_tma_forward_matches_reference(case, dtype, dev):
    q, k, v, _, doc, scale, window = _case(case, dtype, dev)
    o, lse = _tma_forward(q, k, v, doc, scale, window)
    _check_output(o, lse, q, k, v, doc, scale, window, f"{case} tma")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_tma_backward_matches_reference(case, dtype, dev):
    """The dK/dV and dQ kernels with TMA tiles (dkdv reads the GROUP heads' Q/dO through one 3-D descriptor)
    against autograd through the reference, from the reference's o and lse."""
    q, k, v, do, doc, scale, window = _case(case, dtype, dev)
    o, lse = A.attention_forward_ref(q, k, v, doc, scale, window)
    _check_grads(_tma_backward(do, q, k, v, o, lse, doc, scale, window), q, k, v, do, doc, scale, window,
                 f"{case} tma")


# ----------------------------------------------------------------------------------------------------------
# The fused backward (dkdv with FUSED_DQ: dQ by fp32 atomic adds, no dq kernel), pointer and TMA tiles
# ----------------------------------------------------------------------------------------------------------
def _fused_backward(do, q, k, v, o, lse, doc, scale, window, tma=False):
    S = q.shape[1]
    cfg = A._fused_cfg(16, 32, 4, 1, tma) if S <= A._INTERPRETER_LONG_S else A._fused_cfg(64, 64, 4, 1, tma)
    unused_dq_cfg = {}                                   # the fused backward launches no dq kernel
    return A._launch_bwd(do, q, k, v, o, lse, doc, scale, A._window(S, window), cfg, unused_dq_cfg)


@pytest.mark.parametrize("tiles", ["pointer", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_backward_matches_reference(case, dtype, tiles, dev):
    """The fused backward against autograd through the reference, from the reference's o and lse: the same
    cases and rule as the split backward's (dQ of GQA heads, documents, windows and odd lengths included)."""
    q, k, v, do, doc, scale, window = _case(case, dtype, dev)
    o, lse = A.attention_forward_ref(q, k, v, doc, scale, window)
    _check_grads(_fused_backward(do, q, k, v, o, lse, doc, scale, window, tiles == "tma"), q, k, v, do, doc, scale,
                 window, f"{case} fused {tiles}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stored_fused_choice_runs_the_fused_backward(monkeypatch, tmp_path, dtype, dev):
    """A GPU's autotune stored the fused backward as this shape's dkdv choice: attention_backward takes it (the
    dkdv kernel and no dq kernel) and matches the reference; where nothing is stored the split backward runs."""
    monkeypatch.setenv("HORIZON_TUNING_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(tuning, "_cache", None)
    q, k, v, do, doc, scale, window = _case("gqa-docs", dtype, dev)
    o, lse = A.attention_forward_ref(q, k, v, doc, scale, window)
    with tuning.device_named("NVIDIA H100 (stand-in)"):
        tuning.store_config("attention_bwd_dkdv", A._shape_key(q.shape[1], q.shape[3], dtype),
                            A._fused_cfg(16, 32, 4, 1))
    launched = _recording_launches(monkeypatch)
    A.attention_backward(do, q, k, v, o, lse, doc, scale, window)
    assert [name for name, _ in launched] == ["_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    launched.clear()
    with tuning.device_named("NVIDIA H100 (stand-in)"):
        grads = A.attention_backward(do, q, k, v, o, lse, doc, scale, window)
    assert [name for name, _ in launched] == ["_attn_bwd_preprocess", "_attn_bwd_dkdv"]
    _check_grads(grads, q, k, v, do, doc, scale, window, "stored fused")


def test_tma_strided_views_and_fallback(dev, monkeypatch):
    """Head slices of a fused qkv projection (and a head-major dO) are 16-byte aligned views: the TMA tiles read
    them, forward and backward. A head-dim stride ≠ 1 (or a misaligned row) is no TMA layout: the launchers run
    the pointer loads instead, still right (a fused TMA dkdv choice: the split backward's pointer default)."""
    B, S, Hq, Hkv, D = 1, 50, 4, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, device=dev)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    doc = _doc_ids(B, 2 * S, [20]).to(dev)[:, ::2]
    do = torch.randn(B, S, Hq, D, device=dev).transpose(1, 2).contiguous().transpose(1, 2)   # head-major memory
    o_ref, lse_ref = A.attention_forward_ref(q, k, v, doc, 0.125)
    launched = _recording_launches(monkeypatch)
    o, lse = _tma_forward(q, k, v, doc, 0.125, None)
    assert _err(o, o_ref) < 1e-5 and _err(lse, lse_ref) < 1e-5
    for g, w in zip(_tma_backward(do, q, k, v, o, lse, doc, 0.125, None),
                    A.attention_backward_ref(do, q, k, v, o_ref, lse_ref, doc, 0.125)):
        assert _err(g, w) < 1e-5
    assert launched == [("_attn_fwd", True), ("_attn_bwd_preprocess", None), ("_attn_bwd_dkdv", True),
                        ("_attn_bwd_dq", True)]

    launched.clear()
    k_strided = torch.randn(B, S, Hkv, 2 * D, device=dev)[..., ::2]                   # head-dim stride 2
    q_odd = torch.randn(B, S * Hq * D + 1, device=dev)[:, 1:].view(B, S, Hq, D)      # base 4 bytes off 16
    for qx, kx, cfg_dkdv in ((q, k_strided, A._tma_cfg(16, 32, 4, 1)), (q_odd, k, A._fused_cfg(16, 32, 4, 1, True))):
        assert A.tma_unsupported(qx, kx, v) is not None
        o = torch.empty_like(qx)
        lse = torch.empty(B, Hq, S, device=dev)
        A._launch_fwd(qx, kx, v, doc, o, lse, 0.125, 0, A._tma_cfg(32, 16, 4, 1))
        o_ref, lse_ref = A.attention_forward_ref(qx, kx, v, doc, 0.125)
        assert _err(o, o_ref) < 1e-5 and _err(lse, lse_ref) < 1e-5
        grads = A._launch_bwd(do, qx, kx, v, o, lse, doc, 0.125, 0, cfg_dkdv, A._tma_cfg(32, 16, 4, 1))
        for g, w in zip(grads, A.attention_backward_ref(do, qx, kx, v, o_ref, lse_ref, doc, 0.125)):
            assert _err(g, w) < 1e-5
    assert launched == 2 * [("_attn_fwd", False), ("_attn_bwd_preprocess", None), ("_attn_bwd_dkdv", False),
                            ("_attn_bwd_dq", False)]


def test_tma_default_rule():
    """bf16/fp16 at head dims 64 and 128 default to TMA tiles in the forward and both backward kernels; fp32 and
    other head dims keep pointer loads, and so does the fallback (tma=False)."""
    for kernel in _KERNELS:
        for dtype in (torch.bfloat16, torch.float16):
            for D in (64, 128):
                assert A.uses_tma(A.default_config(kernel, D, dtype))
                assert not A.uses_tma(A.default_config(kernel, D, dtype, tma=False))
            for D in (32, 96, 256):
                assert not A.uses_tma(A.default_config(kernel, D, dtype))
        assert not A.uses_tma(A.default_config(kernel, 128, torch.float32))


# ----------------------------------------------------------------------------------------------------------
# Block skipping: NaN planted where no visited block may read it stays out of the outputs. A visited block
# would spread it (0·NaN = NaN in the tile products) even where the mask drops it, so this checks the loop
# ranges, not only the masks. The interpreter tiles are fixed here: fwd/dq 32×16, dkdv 16×32 (the TMA
# forward's 32×16 too).
# ----------------------------------------------------------------------------------------------------------
FWD, DKDV, DQ = A._cfg(32, 16, 4, 1), A._cfg(16, 32, 4, 1), A._cfg(32, 16, 4, 1)


def _run(q, k, v, do, doc, window):
    S = q.shape[1]
    o, lse = A.attention_forward_ref(q.nan_to_num(), k.nan_to_num(), v.nan_to_num(), doc, 0.125, window)
    o_k, lse_k = torch.empty_like(o), torch.empty_like(lse)
    A._launch_fwd(q, k, v, doc, o_k, lse_k, 0.125, A._window(S, window), FWD)
    dq, dk, dv = A._launch_bwd(do, q, k, v, o, lse, doc, 0.125, A._window(S, window), DKDV, DQ)
    return o_k, dq, dk, dv


def _fused_dq(q, k, v, do, doc, window):
    """dQ of the fused backward (dkdv's 16×32 tiles): the dkdv programs' ranges decide which rows it reaches."""
    o, lse = A.attention_forward_ref(q.nan_to_num(), k.nan_to_num(), v.nan_to_num(), doc, 0.125, window)
    return A._launch_bwd(do, q, k, v, o, lse, doc, 0.125, A._window(q.shape[1], window), A._fused_cfg(16, 32, 4, 1),
                         DQ)[0]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # the interpreter warns about the NaN it computes with
@pytest.mark.parametrize("mode", ["causal", "docs", "window"])
def test_skipped_blocks_are_not_read(mode, dev):
    """The split kernels, the TMA forward and the fused backward's dQ (its rows reached from the dkdv ranges)."""
    B, S, H, D = 1, 128, 1, 64
    q, k, v = _inputs(B, S, H, H, D, torch.float32, dev)
    do = torch.randn(B, S, H, D, device=dev)
    doc = _doc_ids(B, S, [40]).to(dev) if mode == "docs" else None
    window = 20 if mode == "window" else None
    if mode == "causal":
        # keys ≥ 96 are above the diagonal of query blocks < 96; queries < 32 are before key blocks ≥ 32
        k[:, 96:], v[:, 96:] = math.nan, math.nan
        q2, do2 = q.clone(), do.clone()
        q2[:, :32], do2[:, :32] = math.nan, math.nan
        o, dq, _, _ = _run(q, k, v, do, doc, window)
        _, _, dk, dv = _run(q2, k.nan_to_num(), v.nan_to_num(), do2, doc, window)
        o_tma, _ = _tma_forward(q, k, v, doc, 0.125, window)
        assert o[:, :96].isfinite().all() and dq[:, :96].isfinite().all() and o_tma[:, :96].isfinite().all()
        assert _fused_dq(q, k, v, do, doc, window)[:, :96].isfinite().all()
        assert dk[:, 32:].isfinite().all() and dv[:, 32:].isfinite().all()
    else:
        # docs: keys < 32 are all in document 0 and query blocks ≥ 64 all in document 1;
        # window 20: query blocks ≥ 64 reach back to key 45 at most. Mirror for dk/dv: key blocks < 32 are
        # never seen by query blocks ≥ 64 (docs: other document; window: 31 + 20 < 64).
        k[:, :32], v[:, :32] = math.nan, math.nan
        q2, do2 = q.clone(), do.clone()
        q2[:, 64:], do2[:, 64:] = math.nan, math.nan
        o, dq, _, _ = _run(q, k, v, do, doc, window)
        _, _, dk, dv = _run(q2, k.nan_to_num(), v.nan_to_num(), do2, doc, window)
        o_tma, _ = _tma_forward(q, k, v, doc, 0.125, window)
        assert o[:, 64:].isfinite().all() and dq[:, 64:].isfinite().all() and o_tma[:, 64:].isfinite().all()
        assert _fused_dq(q, k, v, do, doc, window)[:, 64:].isfinite().all()
        assert dk[:, :32].isfinite().all() and dv[:, :32].isfinite().all()


@triton.jit
def _doc_span_kernel(DOC, OUT, doc_lo, doc_hi, lo, hi, seq_len, BLOCK: tl.constexpr):
    first, end = A._doc_span(DOC, doc_lo, doc_hi, lo, hi, seq_len, BLOCK)
    tl.store(OUT, first)
    tl.store(OUT + 1, end)


@pytest.mark.parametrize("kind", ["packed", "shuffled"])
def test_doc_span_over_several_scan_chunks(kind, dev):
    """The doc-id scan reads 1024 positions per step; long sequences take several steps. Its answer is the run
    of blocks whose [min, max] doc ids meet the program's [doc_lo, doc_hi], for any doc ids (not only packed)."""
    S, BLOCK = 3000, 16
    if kind == "packed":
        doc = _doc_ids(1, S, [700, 1500, 1510, 2600])[0]
    else:
        doc = torch.randint(0, 40, (S,), dtype=torch.int32)
    doc = doc.to(dev)
    for doc_lo, doc_hi, lo, hi in ((2, 2, 0, S), (1, 3, 320, 2999), (0, 0, 1024, 2048), (39, 39, 0, 100)):
        out = torch.empty(2, dtype=torch.int32, device=dev)
        _doc_span_kernel[(1,)](doc, out, doc_lo, doc_hi, lo, hi, S, BLOCK=BLOCK)
        starts = range(lo, hi, BLOCK)
        hits = [b for b in starts if doc[b:b + BLOCK].max() >= doc_lo and doc[b:b + BLOCK].min() <= doc_hi]
        assert out.tolist() == [min(hits, default=hi), max(hits, default=lo - BLOCK) + BLOCK], (doc_lo, doc_hi)


def test_autotune_sweeps_stores_and_reports(dev, monkeypatch, tmp_path, capsys):
    """The GPU autotune's control flow (kernels/sweep.fastest), in the interpreter: each candidate is checked
    against the reference before it is timed; one that fails to build or computes a wrong result is skipped even
    where it would be fastest; the winners land in the tuning cache, and each pass gets a row with its TFLOPS.
    Times are faked: each candidate timed looks slower than the one before."""
    monkeypatch.setenv("HORIZON_TUNING_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(tuning, "_cache", None)
    fake_ms = iter(range(1, 1000))
    monkeypatch.setattr(tuning, "time_ms", lambda fn, **_: (fn(), float(next(fake_ms)))[1])
    launch_fwd, launch_bwd = A._launch_fwd, A._launch_bwd

    def wrong_fwd(q, k, v, doc_ids, o, lse, scale, window, cfg):    # the last partial tile is lost, say
        launch_fwd(q, k, v, doc_ids, o, lse, scale, window, cfg)
        if cfg.get("wrong"):
            o[:, -5:] = 0

    def wrong_bwd(*args):
        dq, dk, dv = launch_bwd(*args)
        if args[-1].get("wrong"):                                    # the dq config
            dq[:, -5:] = 0
        return dq, dk, dv
    monkeypatch.setattr(A, "_launch_fwd", wrong_fwd)
    monkeypatch.setattr(A, "_launch_bwd", wrong_bwd)
    broken = A._cfg(24, 16, 4, 1)                                    # 24 is no power of two: fails to build
    wrong = {**A._cfg(16, 16, 4, 1), "wrong": True}
    configs = ([wrong, broken, A._tma_cfg(32, 16, 4, 1), A._cfg(32, 16, 4, 1)], [A._tma_cfg(16, 32, 4, 1)],
               [wrong, A._cfg(32, 16, 4, 1), A._cfg(16, 16, 4, 1)], [A._fused_cfg(16, 32, 4, 1)])
    rows = A._tune_shape(1, 40, 2, 1, 32, dev, configs)
    assert [r["shape"].split()[-1] for r in rows] == ["fwd", "bwd"]
    # the TMA candidate (timed first) wins
    assert rows[0]["config"] == A._tma_cfg(32, 16, 4, 1)
    assert "TFLOPS" in rows[0]["throughput"]
    # the fused backward is timed after the split one, so slower here: the split configs are kept
    assert rows[1]["config"] == {"dkdv": A._tma_cfg(16, 32, 4, 1), "dq": A._cfg(32, 16, 4, 1)}
    stored = json.loads((tmp_path / "autotune.json").read_text())
    assert set(next(iter(stored.values()))) == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"}
    fwd_stored = next(iter(stored.values()))["attention_fwd"]
    assert fwd_stored[A._shape_key(40, 32, torch.bfloat16)] == A._tma_cfg(32, 16, 4, 1)
    out = capsys.readouterr().out
    assert out.count("wrong result on this device") == 2 and f"skipping {broken}" in out
    assert "storing the fused backward" not in out


def test_autotune_stores_the_fused_backward_where_faster(dev, monkeypatch, tmp_path):
    """Where the fused backward times faster than the split one, autotune stores it as the dkdv choice (dq's
    stays stored for the split one); a wrong fused candidate is skipped. Times are faked: any run that launches
    the dq kernel takes 2 ms, any other 1 ms."""
    monkeypatch.setenv("HORIZON_TUNING_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(tuning, "_cache", None)
    launched = _recording_launches(monkeypatch)

    def fake_ms(fn, **_):
        launched.clear()
        fn()
        return 2.0 if any(name == "_attn_bwd_dq" for name, _ in launched) else 1.0
    monkeypatch.setattr(tuning, "time_ms", fake_ms)
    launch_bwd = A._launch_bwd

    def wrong_bwd(*args):
        dq, dk, dv = launch_bwd(*args)
        if args[-2].get("wrong"):                                    # the dkdv config
            dq[:, :5] = 0
        return dq, dk, dv
    monkeypatch.setattr(A, "_launch_bwd", wrong_bwd)
    fused, wrong = A._fused_cfg(16, 32, 4, 1), {**A._fused_cfg(16, 16, 4, 1), "wrong": True}
    rows = A._tune_shape(1, 40, 2, 1, 32, dev, ([A._cfg(32, 16, 4, 1)], [A._cfg(16, 32, 4, 1)],
                                                [A._cfg(32, 16, 4, 1)], [wrong, fused]))
    assert rows[1]["config"] == {"fused": fused}
    stored = next(iter(json.loads((tmp_path / "autotune.json").read_text()).values()))
    key = A._shape_key(40, 32, torch.bfloat16)
    assert stored["attention_bwd_dkdv"][key] == fused and stored["attention_bwd_dq"][key] == A._cfg(32, 16, 4, 1)


# ----------------------------------------------------------------------------------------------------------
# Hopper build without a GPU: the interpreter runs the kernels as Python, so it cannot tell whether the Triton
# compiler accepts them or whether they spill. A child process without TRITON_INTERPRET compiles them for sm_90
# (tests/hopper_compile.py).
# ----------------------------------------------------------------------------------------------------------
def _compile_sm90(kernel: str, D: int, docs: bool, window: bool, dtype: str = "bf16", cfg: dict | None = None,
                  group: int = 4) -> dict:
    """One kernel for sm_90a in ``dtype`` ("bf16" or "fp32") with ``cfg`` (default: the launcher's default for
    that dtype and head dim) and unit head-dim strides, as the launcher would."""
    from hopper_compile import compile_sm90
    fn, act_ptrs, row_ptrs = {  # kernel → (jit function, its pointers to activations, its pointers to fp32 rows)
        "attention_fwd": (A._attn_fwd, ("Q", "K", "V", "O"), ("LSE",)),
        "attention_bwd_dkdv": (A._attn_bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV"), ("LSE", "DELTA", "DQ_ACC")),
        "attention_bwd_dq": (A._attn_bwd_dq, ("Q", "K", "V", "DO", "DQ"), ("LSE", "DELTA")),
    }[kernel]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    cfg = cfg or A.default_config(kernel, D, torch_dtype)
    constexprs = dict(GROUP=group, HEAD_DIM=D, BLOCK_D=A._block_d(D), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                      HAS_DOCS=docs, HAS_WINDOW=window, UPCAST=False, PRECISION=A._precision(torch_dtype),
                      TMA=A.uses_tma(cfg))
    if kernel == "attention_bwd_dkdv":
        constexprs["FUSED_DQ"] = A.fuses_dq(cfg)
    types, aligned = {}, []
    for name in fn.arg_names:
        if (name == "DOC" and not docs) or (name == "DQ_ACC" and not constexprs["FUSED_DQ"]):
            constexprs[name] = None                                    # the launcher passes None
        elif name.startswith("stride_") and name.endswith("d") and name != "stride_docb":
            constexprs[name] = 1                                       # head-dim strides are 1: specialized
        if name in constexprs:
            continue
        types[name] = (f"*{dtype}" if name in act_ptrs else "*fp32" if name in row_ptrs else "*i32" if name == "DOC"
                       else "fp32" if name in ("qk_scale", "scale") else "i32")
        if types[name].startswith("*") or name.startswith("stride_") or name == "seq_len":
            aligned.append(name)                                       # what Triton infers for aligned tensors
    return compile_sm90(fn, types, constexprs, cfg["num_warps"], cfg["num_stages"], aligned)


_VARIANTS = {"plain": (False, False), "docs": (True, False), "window": (False, True), "docs+window": (True, True)}
_KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")


def _hopper_report() -> dict:
    """The child process of test_defaults_compile_for_hopper_without_spills: every default config. bf16 at the
    engine's head dims (64, 128) in all four variants, at the tests' (32, 96, 256) with documents and a window;
    fp32 at each tile width plain and with documents and a window (the plain loop pipelines differently: at
    hd128 it spilled where the masked one did not). The bf16 defaults at 64 and 128 move tiles by TMA; the
    pointer loads' fallback there (tma=False: strides TMA cannot take) is compiled in the heaviest variant."""
    jobs = [("bf16", D, v) for D in (64, 128) for v in _VARIANTS]
    jobs += [("bf16", D, "docs+window") for D in (32, 96, 256)]
    jobs += [("fp32", D, v) for D in (32, 64, 128, 256) for v in ("plain", "docs+window")]
    report = {f"{k} {dtype} D{D} {v}": _compile_sm90(k, D, *_VARIANTS[v], dtype)
              for dtype, D, v in jobs for k in _KERNELS}
    fallback = {f"{k} pointer bf16 D{D} {v}":
                _compile_sm90(k, D, *_VARIANTS[v], "bf16", A.default_config(k, D, torch.bfloat16, tma=False))
                for k in _KERNELS for D in (64, 128) for v in ("docs+window",)}
    return {**report, **fallback}


def _hopper_candidates_report() -> dict:
    """The child process of test_autotune_candidates_compile_for_hopper: every candidate autotune sweeps (bf16),
    pointer and TMA, at head dim 128 (the widest it sweeps) with documents and a window (the heaviest variant a
    stored config meets; no other variant spilled where it did not, for the TMA backward's candidates under both
    tritons)."""
    lists = {"attention_fwd": A.FWD_CONFIGS, "attention_bwd_dkdv": A.DKDV_CONFIGS, "attention_bwd_dq": A.DQ_CONFIGS}
    report = {f"{k} bf16 D128 docs+window {A._cfg_label(cfg)}": _compile_sm90(k, 128, True, True, "bf16", cfg)
              for k, configs in lists.items() for cfg in configs}
    # the TMA forward's candidates with documents alone at head dim 128 (where triton 3.6 spilled the pruned
    # 128×128 tiles and docs+window did not) and the heaviest at 64
    tma = {f"attention_fwd bf16 D{D} {v} {A._cfg_label(cfg)}": _compile_sm90("attention_fwd", D, *_VARIANTS[v],
                                                                            "bf16", cfg)
           for D, v in [(128, "docs"), (64, "docs+window")] for cfg in A.FWD_TMA_CONFIGS}
    # the fused backward's candidates (the dkdv kernel with FUSED_DQ)
    fused = {f"attention_bwd_dkdv bf16 D128 docs+window {A._cfg_label(cfg)}":
             _compile_sm90("attention_bwd_dkdv", 128, True, True, "bf16", cfg) for cfg in A.FUSED_CONFIGS}
    return {**report, **tma, **fused}


@pytest.mark.slow
def test_defaults_compile_for_hopper_without_spills():
    """Every default config, bf16 and fp32, compiles for sm_90a without register spills and within an H100's
    shared memory; every bf16 dot is a Hopper warpgroup MMA (fp32's IEEE dots have no tensor-core form)."""
    report = hopper_compile.report("test_attention", "_hopper_report")
    assert len(report) == 3 * 19 + 3 * 2
    hopper_compile.assert_fits_without_spills(report)
    # hd256's dkdv takes mma.sync without spills over a spilling wgmma tile (A.DKDV_HD256_KEYS)
    assert A._DEFAULTS["attention_bwd_dkdv"][256]["BLOCK_N"] == A.DKDV_HD256_KEYS < 64
    hopper_compile.assert_hopper_mma({name: r for name, r in report.items()
                                      if " bf16 " in name and name != "attention_bwd_dkdv bf16 D256 docs+window"})


@pytest.mark.slow
def test_autotune_candidates_compile_for_hopper():
    """No candidate the GPU's autotune would compile spills or needs more shared memory than an H100 has, and
    every dot is a wgmma (the TMA forward's candidates also with documents alone at head dim 128 and at 64; the
    fused backward's at head dim 128 with documents and a window, its dQ dot included)."""
    report = hopper_compile.report("test_attention", "_hopper_candidates_report")
    assert len(report) == (len(A.FWD_CONFIGS) + len(A.DKDV_CONFIGS) + len(A.DQ_CONFIGS) + 2 * len(A.FWD_TMA_CONFIGS)
                           + len(A.FUSED_CONFIGS))
    hopper_compile.assert_fits_without_spills(report)
    hopper_compile.assert_hopper_mma(report)


# ----------------------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------------------
def test_rejects_bad_inputs(dev):
    q, k, v = _inputs(1, 16, 4, 2, 64, torch.float32, dev)
    with pytest.raises(ValueError, match="4-D"):
        A.attention_forward(q[0], k, v, None, 0.1)
    with pytest.raises(ValueError, match="must both be"):
        A.attention_forward(q, k[:, :8], v, None, 0.1)
    with pytest.raises(ValueError, match="not a multiple of Hkv=3"):
        A.attention_forward(q, *_inputs(1, 16, 3, 3, 64, torch.float32, dev)[1:], None, 0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        A.attention_forward(q, k.bfloat16(), v, None, 0.1)
    with pytest.raises(ValueError, match="share one dtype"):
        A.attention_forward(*(t.double() for t in (q, k, v)), None, 0.1)
    with pytest.raises(ValueError, match="head dim 72"):
        A.attention_forward(*_inputs(1, 16, 4, 2, 72, torch.float32, dev), None, 0.1)
    with pytest.raises(ValueError, match="int32"):
        A.attention_forward(q, k, v, torch.zeros(1, 16, dtype=torch.int64, device=dev), 0.1)
    with pytest.raises(ValueError, match="doc_ids must be"):
        A.attention_forward(q, k, v, torch.zeros(2, 16, dtype=torch.int32, device=dev), 0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        A.attention_forward(q, k, v, None, 0.1, sliding_window=0)
    o, lse = A.attention_forward_ref(q, k, v, None, 0.1)
    with pytest.raises(ValueError, match="lse must be fp32"):
        A.attention_backward(o, q, k, v, o, lse.transpose(1, 2), None, 0.1)
    with pytest.raises(ValueError, match="do must match q"):
        A.attention_backward(o.bfloat16(), q, k, v, o, lse, None, 0.1)


def test_grid_y_limit_splits_the_batch(monkeypatch, dev):
    """B·Hq can exceed CUDA's 65535 grid rows (many short packed rows × heads): the launchers split the batch so
    that every launch stays within the limit, and the split launches compute what one launch does."""
    assert A.batch_slices(4096, 32) == [(0, 2047), (2047, 4094), (4094, 4096)]   # 4096 · 32 = 131072 rows
    assert all((b1 - b0) * 32 <= A.MAX_GRID_Y for b0, b1 in A.batch_slices(4096, 32))
    assert A.batch_slices(16, 32) == [(0, 16)]
    grids = []                                             # every launch's grid: kernel[grid](...)
    jit_class, launch = type(A._attn_fwd), type(A._attn_fwd).__getitem__
    monkeypatch.setattr(jit_class, "__getitem__", lambda self, grid: (grids.append(grid), launch(self, grid))[1])
    B, S, Hq, Hkv, D = 5, 19, 4, 2, 16
    q, k, v = _inputs(B, S, Hq, Hkv, D, torch.float32, dev)
    do = torch.randn_like(q)
    doc = _doc_ids(B, S, [7]).to(dev)
    whole = _run(q, k, v, do, doc, None)
    monkeypatch.setattr(A, "MAX_GRID_Y", 2 * Hq)          # two batch rows per launch: 3 launches per kernel
    grids.clear()
    split = _run(q, k, v, do, doc, None)
    assert max(g[1] for g in grids) <= 2 * Hq and len(grids) == 4 * 3
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
