"""Fused linear cross-entropy: the reference against torch.autograd, the Triton kernel (interpreter) against
the reference, chunk-bounded memory, and the input errors.

The judge is an fp64 autograd run of F.cross_entropy(h @ Wᵀ) on the same (already rounded) inputs. A kernel
result passes when err_kernel ≤ 2·err_reference + atol, both errors measured against that judge, where the
reference is reference.linear_cross_entropy in the same dtype (its own rounding sets the bar).

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_cross_entropy.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from horizon_triton.kernels import cross_entropy as ce
from horizon_triton.kernels import reference, sweep, tuning
from horizon_triton.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

# Small blocks so that the small test shapes still span many tiles, partial tiles and several K steps.
_GEMM_SMALL = dict(impl="triton", BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=2)
TRITON_SMALL = dict(logits=_GEMM_SMALL, dh=_GEMM_SMALL, dw=_GEMM_SMALL, row=dict(BLOCK_V=128, num_warps=4))
TORCH_GEMMS = dict(logits=ce._TORCH, dh=ce._TORCH, dw=ce._TORCH, row=dict(BLOCK_V=64, num_warps=4))


def _inputs(T, H, V, dtype, dev, ignore=()):
    h = torch.randn(T, H, device=dev).to(dtype)
    weight = (torch.randn(V, H, device=dev) * 2 / H ** 0.5).to(dtype)  # logits of a few units: a peaked softmax
    targets = torch.randint(0, V, (T,), device=dev)
    for sl in ignore:
        targets[sl] = -100
    return h, weight, targets


def _autograd(h, weight, targets, grad_scale, d_weight0):
    """fp64 judge: loss_sum, dh, d_weight0 + dW from torch.autograd on the plain (unfused) formula."""
    h64 = h.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    per_token = F.cross_entropy(h64 @ w64.t(), targets, ignore_index=-100, reduction="none")
    # grad_scale: one number, or per-token weights (of either sign, as DPO's)
    (per_token * (grad_scale.double() if isinstance(grad_scale, torch.Tensor) else grad_scale)).sum().backward()
    return per_token.detach().sum(), h64.grad, d_weight0.double() + w64.grad


def _check(got, ref, exact, what, dtype):
    """err(got) ≤ 2·err(ref) + atol per output (loss, dh, d_weight); atol is a few fp32 ulps of its scale."""
    for name, g, r, e in zip(("loss", "dh", "d_weight"), got, ref, exact):
        atol = 1e-5 * max(e.abs().max().item(), 1e-3)
        assert_within_reference_error(g, r, e, atol, f"{what} {dtype} {name}")


# ----------------------------------------------------------------------------------------------------------
# The reference against autograd
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,H,V,chunk", [(37, 24, 101, 8), (64, 16, 50, 64), (20, 8, 33, 100)])
def test_reference_matches_autograd(T, H, V, chunk, dev):
    h, weight, targets = _inputs(T, H, V, torch.float32, dev, ignore=(slice(0, 3), slice(16, 24)))
    d_weight = torch.randn(V, H, device=dev)
    loss_e, dh_e, dw_e = _autograd(h, weight, targets, 0.25, d_weight)
    loss, dh = linear_cross_entropy_ref(h, weight, targets, d_weight, 0.25, chunk)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), dh_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_weight.double(), dw_e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The kernel against the reference (interpreter)
# ----------------------------------------------------------------------------------------------------------
SHAPES = [  # T, H, V, chunk, ignored token ranges
    (77, 48, 301, 32, (slice(32, 64),)),          # odd T and V; a whole chunk ignored; last chunk short
    (96, 32, 1000, 96, (slice(5, 9),)),           # one chunk, V = 1000 (not a multiple of any block)
    (255, 40, 97, 100, ()),                       # T = 255 in chunks of 100
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,H,V,chunk,ignore", SHAPES)
def test_kernel_matches_reference(T, H, V, chunk, ignore, dtype, dev):
    h, weight, targets = _inputs(T, H, V, dtype, dev, ignore)
    d_weight0 = torch.randn(V, H, device=dev)      # accumulation into an existing gradient
    grad_scale = 0.37
    exact = _autograd(h, weight, targets, grad_scale, d_weight0)
    dw_ref = d_weight0.clone()
    ref = (*linear_cross_entropy_ref(h, weight, targets, dw_ref, grad_scale, chunk), dw_ref)
    dw = d_weight0.clone()
    loss, dh = ce._run(h, weight, targets, dw, grad_scale, chunk, TRITON_SMALL)
    assert loss.dtype == torch.float32 and loss.shape == () and dh.dtype == dtype and dh.shape == h.shape
    _check((loss, dh, dw), ref, exact, "triton GEMMs", dtype)
    for sl in ignore:                                              # ignored tokens get exactly no gradient
        assert dh[sl].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_public_entry_and_torch_gemms(dtype, dev):
    """The public launcher with its default (untuned) config, and the all-cuBLAS choice of the autotuner."""
    T, H, V, chunk = 70, 32, 257, 48
    h, weight, targets = _inputs(T, H, V, dtype, dev, ignore=(slice(0, 5),))
    exact = _autograd(h, weight, targets, 1.0, torch.zeros(V, H, device=dev))
    dw_ref = torch.zeros(V, H, device=dev)
    ref = (*linear_cross_entropy_ref(h, weight, targets, dw_ref, 1.0, chunk), dw_ref)
    dw = torch.zeros(V, H, device=dev)
    got = (*linear_cross_entropy(h, weight, targets, dw, 1.0, chunk), dw)
    _check(got, ref, exact, "default config", dtype)
    dw = torch.zeros(V, H, device=dev)                             # int32 targets: the same numbers
    got32 = (*linear_cross_entropy(h, weight, targets.int(), dw, 1.0, chunk), dw)
    assert all(torch.equal(a, b) for a, b in zip(got, got32))
    dw = torch.zeros(V, H, device=dev)
    _check((*ce._run(h, weight, targets, dw, 1.0, chunk, TORCH_GEMMS), dw), ref, exact, "torch GEMMs", dtype)


def test_all_ignored_and_empty(dev):
    h, weight, targets = _inputs(40, 16, 60, torch.float32, dev, ignore=(slice(None),))
    dw = torch.ones(60, 16, device=dev)
    loss, dh = ce._run(h, weight, targets, dw, 1.0, 16, TRITON_SMALL)
    assert loss.item() == 0 and dh.abs().max() == 0 and torch.equal(dw, torch.ones(60, 16, device=dev))
    loss, dh = linear_cross_entropy(h[:0], weight, targets[:0], dw, 1.0)
    assert loss.item() == 0 and dh.shape == (0, 16) and torch.equal(dw, torch.ones(60, 16, device=dev))


# ----------------------------------------------------------------------------------------------------------
# Vocabulary chunks: the two-pass cross-entropy of the streamed head
# ----------------------------------------------------------------------------------------------------------
def _two_pass(ops, h, weight, targets, d_weight, grad_scale, rows, token_chunk):
    """The engine's use of the chunk ops: pass 1 over lm_head rows [a, a + rows), the loss, pass 2."""
    T, V = h.shape[0], weight.shape[0]
    stats = [torch.full((T,), float("-inf"), device=h.device), torch.zeros(T, device=h.device),
             torch.zeros(T, device=h.device)]
    for a in range(0, V, rows):
        ops.cross_entropy_chunk_stats_(h, weight[a:a + rows], targets, a, *stats, token_chunk=token_chunk)
    loss, lse = reference.cross_entropy_chunk_loss(*stats, targets)
    dh = torch.zeros(h.shape, device=h.device)
    for a in range(0, V, rows):
        ops.cross_entropy_chunk_backward(h, weight[a:a + rows], targets, a, lse, grad_scale, dh, d_weight[a:a + rows],
                                         token_chunk=token_chunk)
    return loss, dh.to(h.dtype)


CHUNK_SHAPES = [  # T, H, V, rows per vocabulary chunk, token chunk, ignored token ranges
    (37, 24, 101, 16, 8, (slice(0, 3), slice(16, 24))),   # odd T, V; last vocabulary chunk 5 rows
    (64, 16, 50, 50, 64, ()),                             # one chunk: the same as the fused op
    (20, 8, 33, 1, 100, (slice(5, 6),)),                  # one row per chunk
]


@pytest.mark.parametrize("T,H,V,rows,token_chunk,ignore", CHUNK_SHAPES)
def test_chunked_reference_matches_autograd(T, H, V, rows, token_chunk, ignore, dev):
    h, weight, targets = _inputs(T, H, V, torch.float32, dev, ignore)
    d_weight = torch.randn(V, H, device=dev)
    loss_e, dh_e, dw_e = _autograd(h, weight, targets, 0.25, d_weight)
    loss, dh = _two_pass(reference, h, weight, targets, d_weight, 0.25, rows, token_chunk)
    torch.testing.assert_close(loss.double(), loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), dh_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_weight.double(), dw_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "library", "triton"])
def test_frozen_head_gives_the_same_dh_without_d_weight(impl, dev, monkeypatch):
    """d_weight=None (a LoRA run's frozen lm_head): no dW GEMM, the same loss and dh bit for bit."""
    from horizon_triton.kernels import library
    monkeypatch.setattr(ce.tuning, "best_config", lambda kernel, key, default: TRITON_SMALL)
    ops = {"reference": reference, "library": library, "triton": ce}[impl]
    h, weight, targets = _inputs(37, 24, 101, torch.bfloat16, dev, (slice(0, 3),))
    d_weight = torch.zeros(101, 24, device=dev)
    loss, dh = ops.linear_cross_entropy(h, weight, targets, d_weight, 0.3, 16)
    frozen_loss, frozen_dh = ops.linear_cross_entropy(h, weight, targets, None, 0.3, 16)
    assert torch.equal(loss, frozen_loss) and torch.equal(dh, frozen_dh) and d_weight.abs().max() > 0
    lse = torch.logsumexp((h @ weight.t()).float(), -1)
    grads = {}
    for d_rows in (d_weight[40:80], None):
        grads[d_rows is None] = torch.zeros(h.shape, device=dev)
        ops.cross_entropy_chunk_backward(h, weight[40:80], targets, 40, lse, 0.3, grads[d_rows is None], d_rows,
                                         token_chunk=16)
    assert torch.equal(grads[False], grads[True]) and grads[True].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,H,V,rows,token_chunk,ignore", CHUNK_SHAPES[:2] + [(50, 40, 97, 30, 32, ())])
def test_chunk_kernels_match_reference(T, H, V, rows, token_chunk, ignore, dtype, dev, monkeypatch):
    monkeypatch.setattr(ce.tuning, "best_config", lambda kernel, key, default: TRITON_SMALL)
    h, weight, targets = _inputs(T, H, V, dtype, dev, ignore)
    d_weight0 = torch.randn(V, H, device=dev)
    exact = _autograd(h, weight, targets, 0.37, d_weight0)
    dw_ref, dw = d_weight0.clone(), d_weight0.clone()
    ref = (*_two_pass(reference, h, weight, targets, dw_ref, 0.37, rows, token_chunk), dw_ref)
    got = (*_two_pass(ce, h, weight, targets, dw, 0.37, rows, token_chunk), dw)
    _check(got, ref, exact, "chunked triton", dtype)
    for sl in ignore:
        assert got[1][sl].abs().max() == 0


def _signed_weights(T, dev):
    """Per-token weights as DPO makes them: one value per sequence, of either sign."""
    per_sequence = torch.tensor([0.3, -0.45, 0.02, -1.1], device=dev)
    return per_sequence[torch.arange(T, device=dev) * 4 // T].float()


@pytest.mark.parametrize("T,H,V,rows,token_chunk,ignore", CHUNK_SHAPES[:2])
def test_chunked_reference_with_per_token_weights_matches_autograd(T, H, V, rows, token_chunk, ignore, dev):
    h, weight, targets = _inputs(T, H, V, torch.float32, dev, ignore)
    scales = _signed_weights(T, dev)
    d_weight = torch.randn(V, H, device=dev)
    loss_e, dh_e, dw_e = _autograd(h, weight, targets, scales, d_weight)
    loss, dh = _two_pass(reference, h, weight, targets, d_weight, scales, rows, token_chunk)
    torch.testing.assert_close(loss.double(), loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh.double(), dh_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_weight.double(), dw_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,H,V,rows,token_chunk,ignore", [CHUNK_SHAPES[0], (50, 40, 97, 97, 32, ())])
def test_chunk_kernel_with_per_token_weights_matches_reference(T, H, V, rows, token_chunk, ignore, dtype, dev,
                                                               monkeypatch):
    monkeypatch.setattr(ce.tuning, "best_config", lambda kernel, key, default: TRITON_SMALL)
    h, weight, targets = _inputs(T, H, V, dtype, dev, ignore)
    scales = _signed_weights(T, dev)
    d_weight0 = torch.randn(V, H, device=dev)
    exact = _autograd(h, weight, targets, scales, d_weight0)
    dw_ref, dw = d_weight0.clone(), d_weight0.clone()
    ref = (*_two_pass(reference, h, weight, targets, dw_ref, scales, rows, token_chunk), dw_ref)
    got = (*_two_pass(ce, h, weight, targets, dw, scales, rows, token_chunk), dw)
    _check(got, ref, exact, "chunked triton, per-token weights", dtype)
    with pytest.raises(ValueError, match=r"per-token grad_scale must be fp32 \["):
        _two_pass(ce, h, weight, targets, dw, scales[:-1], rows, token_chunk)


def test_chunk_kernel_input_errors(dev):
    h, weight, targets = _inputs(8, 4, 10, torch.float32, dev)
    stats = [torch.zeros(8, device=dev) for _ in range(3)]
    with pytest.raises(ValueError, match=r"weight a chunk of lm_head rows \[V_c ≥ 1, H\]"):
        ce.cross_entropy_chunk_stats_(h, weight[:, :3], targets, 0, *stats)
    with pytest.raises(TypeError, match="share one dtype"):
        ce.cross_entropy_chunk_stats_(h, weight.bfloat16(), targets, 0, *stats)
    with pytest.raises(ValueError, match="statistics/gradient buffers fp32"):
        ce.cross_entropy_chunk_backward(h, weight, targets, 0, stats[0], 1.0, torch.zeros(8, 4, device=dev),
                                        torch.zeros(10, 4, device=dev, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------------------
# Memory: nothing of size T × V is ever allocated
# ----------------------------------------------------------------------------------------------------------
def _largest_allocation(fn, dev) -> int:
    """Bytes of the largest net allocation on ``dev`` made by any single torch op while fn runs (profiler)."""
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, profile_memory=True) as prof:
        fn()
    return max((e.device_memory_usage if cuda else e.cpu_memory_usage) for e in prof.events())


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_memory_is_chunk_bounded(impl, dev):
    T, H, V, chunk = 128, 8, 1000, 32                  # T·V = 4 chunks·V ≫ V·H, T·H
    h, weight, targets = _inputs(T, H, V, torch.float32, dev)
    fn = linear_cross_entropy_ref if impl == "reference" else linear_cross_entropy
    largest = _largest_allocation(lambda: fn(h, weight, targets, torch.zeros(V, H, device=dev), 1.0, chunk), dev)
    chunk_bytes = chunk * (-(-V // 16) * 16) * 4        # one logits chunk, rows padded to 16 elements
    assert largest <= chunk_bytes, f"{impl}: an op allocated {largest} B, more than one logits chunk " \
                                   f"({chunk_bytes} B); the whole [T, V] logits would be {T * V * 4} B"


# ----------------------------------------------------------------------------------------------------------
# Input errors
# ----------------------------------------------------------------------------------------------------------
def _call(dev, T=8, H=4, V=10, dtype=torch.float32, **over):
    args = dict(h=torch.randn(T, H, dtype=dtype), weight=torch.randn(V, H, dtype=dtype),
                targets=torch.randint(0, V, (T,)), d_weight=torch.zeros(V, H), grad_scale=1.0, chunk_size=4)
    args.update(over)
    return linear_cross_entropy(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()})


@pytest.mark.parametrize("over,match", [
    (dict(h=torch.randn(2, 4, 4)), r"h must be \[T, H\]"),
    (dict(weight=torch.randn(10, 5)), r"must be \[vocab_size, 4\]"),
    (dict(weight=torch.randn(10, 4, dtype=torch.bfloat16)), "share one dtype"),
    (dict(h=torch.randn(8, 4, dtype=torch.float16), weight=torch.randn(10, 4, dtype=torch.float16)), "bf16/fp32"),
    (dict(targets=torch.zeros(7, dtype=torch.int64)), r"targets must be int64/int32 \[8\]"),
    (dict(targets=torch.zeros(8)), "targets must be int64/int32"),
    (dict(d_weight=torch.zeros(10, 4, dtype=torch.bfloat16)), "fp32 .10, 4. gradient buffer"),
    (dict(targets=torch.tensor([0, 1, 2, 10, 3, 4, 5, 6])), r"token 3 has target id 10, outside \[0, vocab_size=10\)"),
    (dict(targets=torch.tensor([0, 1, -1, 2, 3, 4, 5, 6])), "token 2 has target id -1"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
])
def test_input_errors(over, match, dev):
    if dev.type == "cuda" and "target id" in match:
        pytest.skip("on CUDA a bad target id trips a device-side assert (no host sync), which would leave this "
                    "process without a usable CUDA context; the named error is the CPU and interpreter path's")
    with pytest.raises((ValueError, TypeError), match=match):
        _call(dev, **over)


# ----------------------------------------------------------------------------------------------------------
# Autotune dry run (interpreter, fake timer) and a compile of the real kernels for sm_90 (no GPU needed)
# ----------------------------------------------------------------------------------------------------------
def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    """Every candidate runs once through the sweep code (checked, fake-timed); the last, 'fastest', candidate of
    each role is stored and is what the launcher would read back."""
    monkeypatch.setattr(ce, "CHECK_TOKENS", 20)
    monkeypatch.setattr(ce, "_ROW_CANDIDATES", [dict(BLOCK_V=64, num_warps=4), dict(BLOCK_V=128, num_warps=4)])
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, ce, "_GEMM_CANDIDATES", [_GEMM_SMALL, ce._TORCH],
                                    dict(T=40, H=16, V=70, chunk=32), dev)
    (row,) = rows
    assert row["shape"]["chunk"] == 32 and "TFLOPS" in row["throughput"]
    assert row["config"] == dict(logits=ce._TORCH, dh=ce._TORCH, dw=ce._TORCH, row=dict(BLOCK_V=128, num_warps=4))
    assert stored["cross_entropy"][ce.shape_key(torch.bfloat16, 16, 70, 32)] == row["config"]


def test_autotune_skips_wrong_candidates(monkeypatch, capsys, dev):
    """A candidate that computes the wrong thing on this device is never timed or stored."""
    real = ce._matmul

    def matmul(a, b, c, cfg, accumulate=False):
        real(a, b, c, ce._TORCH if cfg["impl"] == "broken" else cfg, accumulate)
        if cfg["impl"] == "broken":
            c.mul_(1.01)                            # a 1 % error: what a bad tile edge or a dropped beta gives
    monkeypatch.setattr(ce, "_matmul", matmul)
    monkeypatch.setattr(tuning, "time_ms", lambda fn, warmup=0, rep=0: fn() or 1.0)
    base = ce.default_config(torch.bfloat16)
    assert ce.check_error({**base, "dw": dict(impl="broken")}, 16, 70, dev, tokens=20) > 1
    assert ce.check_error(base, 16, 70, dev, tokens=20) <= 1
    timed = []
    best, _ = sweep.fastest("ce", [dict(impl="broken"), ce._TORCH], timed.append,
                            lambda c: ce.check_error({**base, "dh": c}, 16, 70, dev, tokens=20), tol=1.0)
    assert best == ce._TORCH and timed == [ce._TORCH]
    assert "wrong result on this device" in capsys.readouterr().out


def _compile_gemm(role: str, g: dict, dtype: str) -> dict:
    """One GEMM role ("logits", "dh", "dw") at config g in dtype ("bf16", "fp32"), strides as the launcher's."""
    from hopper_compile import compile_sm90
    meta = dict(INTERPRETER=False, PRECISION="tf32" if dtype == "bf16" else "ieee", BLOCK_M=g["BLOCK_M"],
                BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"], GROUP_M=g["GROUP_M"])
    if role == "logits":
        types = dict(h_ptr=f"*{dtype}", w_ptr=f"*{dtype}", logits_ptr=f"*{dtype}", tile_max_ptr="*fp32",
                     tile_sum_ptr="*fp32", n_rows="i32", V="i32", H="i32", stride_h="i32", stride_w="i32",
                     stride_logits="i32", stride_stats="i32")
        return compile_sm90(ce._logits_kernel, types, meta, g["num_warps"], g["num_stages"])
    # dh = g @ W: unit strides along V (g) and H (W, dh); dW += gᵀ @ h: gᵀ is unit-stride along M = V
    mm = ["a_ptr", "b_ptr", "c_ptr", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
          "stride_cn"]
    unit = ("stride_ak", "stride_bn") if role == "dh" else ("stride_am", "stride_bn")
    types = {n: (f"*{dtype}" if n.endswith("_ptr") else "i32") for n in mm if n not in (*unit, "stride_cn")}
    types["c_ptr"] = f"*{dtype}" if role == "dh" else "*fp32"
    meta.update(ACCUMULATE=role == "dw", stride_cn=1, **dict.fromkeys(unit, 1))
    return compile_sm90(ce._matmul_kernel, types, meta, g["num_warps"], g["num_stages"])


def _compile_rows(row: dict, dtype: str) -> dict:
    """The two row kernels (the softmax gradient from the logits GEMM's tile statistics, or from its own pass)."""
    from hopper_compile import compile_sm90
    meta = dict(IGNORE=-100, BLOCK_V=row["BLOCK_V"])
    types = dict(logits_ptr=f"*{dtype}", targets_ptr="*i64", loss_ptr="*fp32", V="i32", V_alloc="i32",
                 stride_row="i32", grad_scale="fp32")
    out = {"row": compile_sm90(ce._softmax_grad_kernel, types, meta, row["num_warps"], 1)}
    types = dict(logits_ptr=f"*{dtype}", targets_ptr="*i64", loss_ptr="*fp32", tile_max_ptr="*fp32",
                 tile_sum_ptr="*fp32", V="i32", V_alloc="i32", n_tiles="i32", stride_row="i32", stride_stats="i32",
                 grad_scale="fp32")
    out["row_from_stats"] = compile_sm90(ce._softmax_grad_from_stats_kernel, types, dict(meta, BLOCK_TILES=512),
                                         row["num_warps"], 1)
    return out


def _hopper_report() -> dict:
    """Every kernel of the module compiled for sm_90 (tests/hopper_compile.py) at its default bf16 and fp32
    configs; child process of test_defaults_compile_for_hopper."""
    report = {}
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg = ce.default_config(torch_dtype)
        for role in ("logits", "dh", "dw"):
            if cfg[role]["impl"] == "triton":
                report[f"gemm_{role}/{dtype}"] = _compile_gemm(role, cfg[role], dtype)
        report.update({f"{name}/{dtype}": r for name, r in _compile_rows(cfg["row"], dtype).items()})
    return report


def _hopper_candidates_report() -> dict:
    """Every Triton candidate of the autotune sweep (bf16); child process of test_candidates_compile_for_hopper."""
    report = {}
    for role in ("logits", "dh", "dw"):
        for g in ce.gemm_candidates(role):
            if g["impl"] == "triton":
                label = f"{g['BLOCK_M']}x{g['BLOCK_N']}x{g['BLOCK_K']} w{g['num_warps']} s{g['num_stages']}"
                report[f"gemm_{role}/bf16/{label}"] = _compile_gemm(role, g, "bf16")
    for row in ce._ROW_CANDIDATES:
        for name, r in _compile_rows(row, "bf16").items():
            report[f"{name}/bf16/V{row['BLOCK_V']} w{row['num_warps']}"] = r
    return report


@pytest.mark.slow
def test_defaults_compile_for_hopper():
    """The interpreter never compiles: build the real kernels for sm_90 (in child processes without it) and
    require, at the default configs of both dtypes, no register spills and an H100's shared memory; the bf16
    GEMMs are pipelined and every dot of theirs is a wgmma (fp32's IEEE dots have no tensor-core form)."""
    report = hopper_compile.report("test_cross_entropy", "_hopper_report")
    assert set(report) == {"gemm_logits/bf16", "gemm_dw/bf16", "row/bf16", "row_from_stats/bf16",
                           "gemm_logits/fp32", "gemm_dw/fp32", "row/fp32", "row_from_stats/fp32"}
    hopper_compile.assert_fits_without_spills(report)
    gemms = {n: r for n, r in report.items() if n.startswith("gemm") and n.endswith("/bf16")}
    hopper_compile.assert_hopper_mma(gemms)
    assert all(r["pipelined"] for r in gemms.values()), gemms


@pytest.mark.slow
def test_candidates_compile_for_hopper():
    """No candidate the GPU's autotune would compile spills or overflows an H100's shared memory."""
    report = hopper_compile.report("test_cross_entropy", "_hopper_candidates_report")
    hopper_compile.assert_fits_without_spills(report)
    hopper_compile.assert_hopper_mma({n: r for n, r in report.items() if n.startswith("gemm")})
